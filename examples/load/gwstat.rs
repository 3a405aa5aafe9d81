//! Gateway observer: samples another process's CPU time (utime + stime from
//! `/proc/PID/stat`) and resident set size (`VmRSS` from `/proc/PID/status`)
//! so the load tool can report the gateway's CPU%, CPU per delivery and RSS
//! over the measurement window. Linux only.

use std::time::Instant;

/// One sample of a process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When it was taken.
    pub at: Instant,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
}

/// Samples one process.
pub struct Observer {
    pid: u32,
    ticks_per_sec: u64,
}

impl Observer {
    /// Checks that `pid` exists and learns the clock tick rate by running
    /// `getconf CLK_TCK` once (falls back to 100, the Linux default, and
    /// says so on stderr).
    pub fn new(pid: u32) -> Result<Observer, String> {
        let ticks_per_sec = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .filter(|&t| t > 0)
            .unwrap_or_else(|| {
                eprintln!("load: `getconf CLK_TCK` failed; assuming 100 clock ticks per second");
                100
            });
        let observer = Observer { pid, ticks_per_sec };
        observer.sample()?;
        Ok(observer)
    }

    /// Clock ticks per second used to convert CPU time.
    pub fn ticks_per_sec(&self) -> u64 {
        self.ticks_per_sec
    }

    /// Reads the process's CPU time and RSS now.
    pub fn sample(&self) -> Result<Sample, String> {
        let at = Instant::now();
        let stat_path = format!("/proc/{}/stat", self.pid);
        let stat = std::fs::read_to_string(&stat_path).map_err(|e| format!("{stat_path}: {e}"))?;
        // The command name may contain spaces and parentheses: fields start
        // after the last ')'. After it come state (field 3) ... utime (14), stime (15).
        let rest = stat
            .rfind(')')
            .map(|i| &stat[i + 1..])
            .ok_or_else(|| format!("{stat_path}: unexpected format"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Result<u64, String> {
            fields
                .get(n - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("{stat_path}: no field {n}"))
        };
        let cpu_ticks = field(14)? + field(15)?;
        let status_path = format!("/proc/{}/status", self.pid);
        let status =
            std::fs::read_to_string(&status_path).map_err(|e| format!("{status_path}: {e}"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| format!("{status_path}: no VmRSS"))?;
        Ok(Sample {
            at,
            cpu_ticks,
            rss_kib,
        })
    }

    /// CPU time between two samples, in microseconds.
    pub fn cpu_us(&self, from: &Sample, to: &Sample) -> u64 {
        to.cpu_ticks.saturating_sub(from.cpu_ticks) * 1_000_000 / self.ticks_per_sec
    }
}
