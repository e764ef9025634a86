fn main() {
    seedflow::train::keep_freed_memory();
    std::process::exit(seedflow::cli::main());
}
