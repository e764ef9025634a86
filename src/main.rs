fn main() {
    std::process::exit(seedflow::cli::main());
}
