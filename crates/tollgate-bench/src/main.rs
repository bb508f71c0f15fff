//! `tollgate-load`: see the library docs (`tollgate_bench`) for how it measures.

use std::process::ExitCode;

use clap::Parser;
use tollgate_bench::cli::Args;
use tollgate_bench::{report, run};

fn main() -> ExitCode {
    let args = Args::parse();
    let plan = match args.plan() {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("tollgate-load: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate-load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::run(plan.clone())) {
        Ok(stats) => {
            println!(
                "{}",
                report::report(&args.url, &plan, args.threads.max(1), &stats)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate-load: {e}");
            ExitCode::FAILURE
        }
    }
}
