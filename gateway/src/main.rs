//! `trio-gateway`: the shipped binary; the command line itself is [`trio_gateway::cli`].

/// jemalloc rather than the system allocator. The gateway makes many short-lived allocations
/// (AMQP frames, rows, JSON values), often freed on another thread than the one that made them
/// (lapin's I/O thread, tokio's workers). Under the benchmark (`trio-bench`) glibc's malloc took
/// about 40 % of the gateway's CPU time and mimalloc about 30 % (`perf`: its free-list pops and
/// cross-thread collection); with jemalloc the gateway cost about a fifth less CPU per message
/// (26–28 against 33–35 µs at 1:1) and half the peak RSS. `trio-bench` declares the same
/// allocator, so the gateway it measures is this one.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    trio_gateway::cli::main()
}
