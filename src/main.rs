fn main() {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`seedflow docs | head`) panics; a
    // command-line tool should end quietly instead, as the default handler does. A run's writes
    // are atomic, so one ended this way resumes.
    #[cfg(unix)]
    // SAFETY: called first, before any thread starts; restores the signal's default action.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Libraries' errors that capture a backtrace when `RUST_BACKTRACE` is set (candle's) print
    // it in their message, which would land in a diagnostic. Panics still honour `RUST_BACKTRACE`.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: no thread has started yet.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    seedflow::train::keep_freed_memory();
    // SAFETY: no thread has started yet.
    unsafe { seedflow::train::share_cores_with_gemm() };
    std::process::exit(seedflow::cli::main());
}
