fn main() {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`seedflow docs | head`) panics; a
    // command-line tool should end quietly instead, as the default handler does. A run's writes
    // are atomic, so one ended this way resumes.
    #[cfg(unix)]
    // SAFETY: called first, before any thread starts; restores the signal's default action.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    seedflow::train::keep_freed_memory();
    // SAFETY: no thread has started yet.
    unsafe { seedflow::train::share_cores_with_gemm() };
    std::process::exit(seedflow::cli::main());
}
