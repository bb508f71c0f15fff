// The request path allocates many small, short-lived objects (CEL values, header maps,
// JSON); mimalloc handles that pattern markedly better than glibc's malloc (measured in
// the load benchmark, see the README).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}
