//! Prints a lab run's attempts (`target/lab-results/<run id>.jsonl`) as one table: per
//! scenario, its attempts, how the first ended, every outcome and the time taken, then the
//! reruns and why each failed attempt ended.
//!
//! usage: lab-summary [RESULTS.jsonl]   (default: the newest file in target/lab-results/)

use std::path::PathBuf;
use std::process::ExitCode;

use vmr_tests::{read_records, results_dir, summary_table};

fn main() -> ExitCode {
    let path = match std::env::args_os().nth(1) {
        Some(p) => PathBuf::from(p),
        None => {
            let newest = std::fs::read_dir(results_dir()).ok().and_then(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
                    .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
                    .map(|e| e.path())
            });
            match newest {
                Some(p) => p,
                None => {
                    println!(
                        "lab summary: no lab runs recorded in {}",
                        results_dir().display()
                    );
                    return ExitCode::SUCCESS;
                }
            }
        }
    };
    match read_records(&path) {
        Ok(records) if !records.is_empty() => {
            println!("lab summary ({}):", path.display());
            print!("{}", summary_table(&records));
        }
        Ok(_) => println!("lab summary: no lab runs in {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!(
                "lab summary: no lab runs recorded ({} does not exist)",
                path.display()
            )
        }
        Err(e) => {
            eprintln!("lab summary: cannot read {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
