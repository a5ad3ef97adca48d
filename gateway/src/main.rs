//! `trio-gateway`: the shipped binary; the command line itself is [`trio_gateway::cli`].

fn main() -> anyhow::Result<()> {
    trio_gateway::cli::main()
}
