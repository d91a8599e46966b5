//! The machine around a section's measurement: processes' CPU time (for the
//! proxies' CPU per request), the whole machine's busy CPU time, how busy
//! the CPUs were before and after, how many cores there are, and the raised
//! priority the section's processes run at.

use std::{fs, thread, time::Duration};

/// Clock ticks of user and system time the processes have used so far
/// (`/proc/PID/stat`, all threads); none if one of them is gone.
pub(super) fn cpu_ticks(pids: &[u32]) -> Option<(u64, u64)> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().try_fold((0, 0), |(u, s), pid| {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces: fields count from after ')'.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line.
        Some((
            u + f.get(11)?.parse::<u64>().ok()?,
            s + f.get(12)?.parse::<u64>().ok()?,
        ))
    })
}

/// The whole machine's busy CPU time since boot, in clock ticks (/proc/stat:
/// user + nice + system + irq + softirq + steal, over all CPUs): also the
/// kernel's work in softirq and kworkers, which no process is charged for.
pub(super) fn busy_ticks() -> Option<u64> {
    let f = cpu_jiffies()?;
    Some(f[0] + f[1] + f[2] + f[5] + f[6] + f[7])
}

/// The first line of /proc/stat: user nice system idle iowait irq softirq
/// steal, in jiffies since boot, over all CPUs.
fn cpu_jiffies() -> Option<[u64; 8]> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.try_into().ok()
}

pub(super) fn ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

pub(super) fn cores() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// Everything the section starts (client, proxies, origin) inherits a nice
/// value of -10 from this thread, so other work on the machine (a build, say)
/// disturbs the measurement less; they all share it, so none is favoured.
/// The previous value comes back on drop.
pub(super) struct Priority(libc::c_int);

impl Priority {
    pub(super) fn raise() -> Priority {
        // SAFETY: getpriority/setpriority take no pointers; `0` is this
        // thread (Linux keeps nice values per thread).
        unsafe {
            let before = libc::getpriority(libc::PRIO_PROCESS, 0);
            libc::setpriority(libc::PRIO_PROCESS, 0, -10);
            Priority(before)
        }
    }
}

impl Drop for Priority {
    fn drop(&mut self) {
        // SAFETY: as in `raise`.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, self.0) };
    }
}

/// How busy the machine's CPUs were over one second, in percent, from
/// /proc/stat: other work running around the section (the load average would
/// mostly show the L4 section that just ran).
pub(super) fn cpu_busy() -> String {
    // (idle, total) jiffies since boot.
    let sample = || cpu_jiffies().map(|f| (f[3] + f[4], f.iter().sum::<u64>()));
    let Some((idle0, total0)) = sample() else {
        return "?".into();
    };
    thread::sleep(Duration::from_secs(1));
    match sample() {
        Some((idle1, total1)) if total1 > total0 => format!(
            "{:.0}%",
            100.0 * (1.0 - (idle1 - idle0) as f64 / (total1 - total0) as f64)
        ),
        _ => "?".into(),
    }
}
