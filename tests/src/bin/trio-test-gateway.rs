//! The shipped `trio-gateway` command line, built inside the test package so that its tests can
//! run (and kill -9) a real gateway process: `env!("CARGO_BIN_EXE_trio-test-gateway")`.

fn main() -> anyhow::Result<()> {
    trio_gateway::cli::main()
}
