//! `trio-gateway`: the shipped binary; the command line itself is [`trio_gateway::cli`].

/// mimalloc rather than glibc's malloc: under load the benchmark (`trio-bench`) found about 40 %
/// of the gateway's own CPU time in glibc's allocator (AMQP frames, rows, JSON values are many
/// short-lived allocations across threads). `trio-bench` declares the same allocator, so the
/// gateway it measures is this one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    trio_gateway::cli::main()
}
