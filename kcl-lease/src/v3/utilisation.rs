//! The CPU utilisation a worker reports in its WorkerMetricStats row (metric `C`): the
//! share of the CPU this process's container may use that it did use, in percent, read
//! from files under an injected filesystem root (normally `/`), never from a metadata
//! service.
//!
//! [`CpuSampler::detect`] picks the first source that exists, in this order:
//!
//! 1. **cgroup v2** (`sys/fs/cgroup/cgroup.controllers` exists). The process's cgroup is
//!    the `0::<path>` line of `proc/self/cgroup`; its `cpu.stat` (`usage_usec`) is read
//!    (falling back to the mount's own `cpu.stat` when the path is not visible, as inside
//!    a container with its own cgroup namespace). The limit is the smallest
//!    `cpu.max` quota/period of the cgroup and its ancestors; with none (`max`), the CPUs
//!    of `cpuset.cpus.effective`, else the CPUs in `proc/stat`.
//! 2. **cgroup v1** (a `cpuacct.usage` under `sys/fs/cgroup/cpuacct`, `cpu,cpuacct` or
//!    `cpu`, in the process's cgroup or at the mount root). Usage is in nanoseconds; the
//!    limit is `cpu.cfs_quota_us / cpu.cfs_period_us` (`-1`: none), else the CPUs of
//!    `cpuset.effective_cpus` (or `cpuset.cpus`), else those in `proc/stat`.
//! 3. **`proc/stat`**: the whole machine, from the first `cpu` line: busy = user + nice +
//!    system + irq + softirq + steal, idle = idle + iowait (the Java KCL counts iowait as
//!    busy; a process waiting on the disk is not using the CPU, so we do not).
//!
//! Utilisation is a difference between two samples, so the first sample of a sampler
//! gives `None`, as does a sample after a counter went backwards (a cgroup recreated) or
//! after no time passed. The cgroup rates are taken over the injected monotonic clock's
//! elapsed time (the caller passes `now`), so they are testable on a manual clock. The
//! limit is read again at every sample, so a changed quota is followed. Values are clamped
//! to 0..=100.
//!
//! Reading these files is fast and never blocks on the network; a caller on an async
//! runtime may still prefer `spawn_blocking` for it.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors of the utilisation sampler.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UtilisationError {
    /// None of the sources exists under the root.
    #[error(
        "no CPU accounting under {root}: no cgroup v2 cpu.stat, no cgroup v1 cpuacct.usage, no proc/stat"
    )]
    NoSource {
        /// The filesystem root searched.
        root: PathBuf,
    },
    /// A file could not be read.
    #[error("could not read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file did not hold what was expected.
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Where a [`CpuSampler`] reads from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum CpuSourceKind {
    /// cgroup v2 `cpu.stat` and `cpu.max`.
    CgroupV2,
    /// cgroup v1 `cpuacct.usage` and the CFS quota.
    CgroupV1,
    /// `/proc/stat` (the whole machine).
    ProcStat,
}

#[derive(Clone, Debug)]
enum Source {
    V2 {
        stat: PathBuf,
        /// `cpu.max` files from the cgroup up to the mount root.
        limits: Vec<PathBuf>,
        cpusets: Vec<PathBuf>,
    },
    V1 {
        usage: PathBuf,
        /// Directories holding `cpu.cfs_quota_us` / `cpu.cfs_period_us`, first found wins.
        quota_dirs: Vec<PathBuf>,
        cpusets: Vec<PathBuf>,
    },
    Proc,
}

#[derive(Clone, Copy, Debug)]
enum Last {
    Cgroup { at: Instant, used: Duration },
    Proc { busy: u64, idle: u64 },
}

/// Samples CPU utilisation. See the [module documentation](self).
#[derive(Clone, Debug)]
pub struct CpuSampler {
    root: PathBuf,
    source: Source,
    last: Option<Last>,
}

const CGROUP: &str = "sys/fs/cgroup";
const PROC_STAT: &str = "proc/stat";
const PROC_SELF_CGROUP: &str = "proc/self/cgroup";

impl CpuSampler {
    /// Finds the source under `root` (normally `/`).
    pub fn detect(root: impl Into<PathBuf>) -> Result<Self, UtilisationError> {
        let root = root.into();
        let cgroup_lines = read(&root, Path::new(PROC_SELF_CGROUP)).unwrap_or_default();
        let source = detect_v2(&root, &cgroup_lines)
            .or_else(|| detect_v1(&root, &cgroup_lines))
            .or_else(|| exists(&root, Path::new(PROC_STAT)).then_some(Source::Proc))
            .ok_or_else(|| UtilisationError::NoSource { root: root.clone() })?;
        Ok(Self {
            root,
            source,
            last: None,
        })
    }

    /// The source in use.
    pub fn kind(&self) -> CpuSourceKind {
        match self.source {
            Source::V2 { .. } => CpuSourceKind::CgroupV2,
            Source::V1 { .. } => CpuSourceKind::CgroupV1,
            Source::Proc => CpuSourceKind::ProcStat,
        }
    }

    /// How many CPUs the process may use now (the cgroup limit; for `proc/stat`, the CPUs of
    /// the machine).
    pub fn cpu_limit(&self) -> Result<f64, UtilisationError> {
        match &self.source {
            Source::V2 {
                limits, cpusets, ..
            } => {
                let mut limit: Option<f64> = None;
                for file in limits {
                    if let Some(quota) = v2_quota(&self.root, file)? {
                        limit = Some(limit.map_or(quota, |l| l.min(quota)));
                    }
                }
                match limit {
                    Some(l) => Ok(l),
                    None => self.cpu_count(cpusets),
                }
            }
            Source::V1 {
                quota_dirs,
                cpusets,
                ..
            } => {
                for dir in quota_dirs {
                    let quota_file = dir.join("cpu.cfs_quota_us");
                    if !exists(&self.root, &quota_file) {
                        continue;
                    }
                    let quota = parse_i64(&self.root, &quota_file)?;
                    if quota < 0 {
                        break;
                    }
                    let period_file = dir.join("cpu.cfs_period_us");
                    let period = parse_i64(&self.root, &period_file)?;
                    if period <= 0 || quota == 0 {
                        return Err(parse_error(
                            &self.root,
                            &period_file,
                            format!("quota {quota} / period {period} is no limit"),
                        ));
                    }
                    return Ok(quota as f64 / period as f64);
                }
                self.cpu_count(cpusets)
            }
            Source::Proc => self.cpu_count(&[]),
        }
    }

    fn cpu_count(&self, cpusets: &[PathBuf]) -> Result<f64, UtilisationError> {
        for file in cpusets {
            if let Some(text) = read(&self.root, file) {
                let text = text.trim();
                if !text.is_empty() {
                    return count_cpu_list(text).map(f64::from).ok_or_else(|| {
                        parse_error(&self.root, file, format!("bad CPU list {text:?}"))
                    });
                }
            }
        }
        let path = Path::new(PROC_STAT);
        let stat = read_required(&self.root, path)?;
        let cpus = stat
            .lines()
            .filter(|l| {
                l.strip_prefix("cpu")
                    .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
            })
            .count();
        if cpus == 0 {
            return Err(parse_error(&self.root, path, "no cpuN lines".to_owned()));
        }
        Ok(cpus as f64)
    }

    /// Takes a sample at monotonic time `now`: the utilisation since the previous sample in
    /// percent (0..=100), or `None` when there is nothing to compare with yet.
    pub fn sample(&mut self, now: Instant) -> Result<Option<f64>, UtilisationError> {
        match &self.source {
            Source::V2 { stat, .. } => {
                let text = read_required(&self.root, stat)?;
                let micros = text
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        parse_error(&self.root, stat, "no usage_usec line".to_owned())
                    })?;
                let limit = self.cpu_limit()?;
                Ok(self.cgroup_rate(now, Duration::from_micros(micros), limit))
            }
            Source::V1 { usage, .. } => {
                let nanos = u64::try_from(parse_i64(&self.root, usage)?)
                    .map_err(|_| parse_error(&self.root, usage, "negative usage".to_owned()))?;
                let limit = self.cpu_limit()?;
                Ok(self.cgroup_rate(now, Duration::from_nanos(nanos), limit))
            }
            Source::Proc => {
                let path = Path::new(PROC_STAT);
                let text = read_required(&self.root, path)?;
                let (busy, idle) = proc_times(&text).ok_or_else(|| {
                    parse_error(&self.root, path, "no aggregate cpu line".to_owned())
                })?;
                let previous = self.last.replace(Last::Proc { busy, idle });
                Ok(match previous {
                    Some(Last::Proc {
                        busy: last_busy,
                        idle: last_idle,
                    }) if busy >= last_busy && idle >= last_idle => {
                        let d_busy = busy - last_busy;
                        let total = d_busy + (idle - last_idle);
                        (total > 0)
                            .then(|| (d_busy as f64 / total as f64 * 100.0).clamp(0.0, 100.0))
                    }
                    _ => None,
                })
            }
        }
    }

    fn cgroup_rate(&mut self, now: Instant, used: Duration, limit: f64) -> Option<f64> {
        let previous = self.last.replace(Last::Cgroup { at: now, used });
        let Some(Last::Cgroup {
            at: last_at,
            used: last_used,
        }) = previous
        else {
            return None;
        };
        let elapsed = now.checked_duration_since(last_at)?;
        let used = used.checked_sub(last_used)?;
        if elapsed.is_zero() || limit <= 0.0 {
            return None;
        }
        let cores = used.as_secs_f64() / elapsed.as_secs_f64();
        Some((cores / limit * 100.0).clamp(0.0, 100.0))
    }
}

fn detect_v2(root: &Path, cgroup_lines: &str) -> Option<Source> {
    let mount = Path::new(CGROUP);
    if !exists(root, &mount.join("cgroup.controllers")) {
        return None;
    }
    let own = cgroup_lines
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().trim_start_matches('/'))
        .filter(|p| !p.is_empty());
    let dir = own
        .map(|p| mount.join(p))
        .filter(|d| exists(root, &d.join("cpu.stat")))
        .unwrap_or_else(|| mount.to_path_buf());
    let stat = dir.join("cpu.stat");
    if !exists(root, &stat) {
        return None;
    }
    let mut limits = Vec::new();
    let mut cpusets = Vec::new();
    let mut at = Some(dir.as_path());
    while let Some(d) = at {
        limits.push(d.join("cpu.max"));
        cpusets.push(d.join("cpuset.cpus.effective"));
        if d == mount {
            break;
        }
        at = d.parent();
    }
    Some(Source::V2 {
        stat,
        limits,
        cpusets,
    })
}

fn detect_v1(root: &Path, cgroup_lines: &str) -> Option<Source> {
    let mount = Path::new(CGROUP);
    // `N:controllers:/path` lines; the path of the cpuacct (or cpu) hierarchy.
    let path_of = |controller: &str| {
        cgroup_lines.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == controller)
                .then(|| path.trim().trim_start_matches('/').to_owned())
        })
    };
    let candidates = |names: &[&str], path: Option<String>| {
        let mut dirs = Vec::new();
        for name in names {
            if let Some(p) = path.as_deref().filter(|p| !p.is_empty()) {
                dirs.push(mount.join(name).join(p));
            }
            dirs.push(mount.join(name));
        }
        dirs
    };
    let usage = candidates(
        &["cpuacct", "cpu,cpuacct", "cpuacct,cpu", "cpu"],
        path_of("cpuacct"),
    )
    .into_iter()
    .map(|d| d.join("cpuacct.usage"))
    .find(|f| exists(root, f))?;
    let quota_dirs = candidates(&["cpu", "cpu,cpuacct", "cpuacct,cpu"], path_of("cpu"));
    let cpusets = candidates(&["cpuset"], path_of("cpuset"))
        .into_iter()
        .flat_map(|d| [d.join("cpuset.effective_cpus"), d.join("cpuset.cpus")])
        .collect();
    Some(Source::V1 {
        usage,
        quota_dirs,
        cpusets,
    })
}

/// The quota of a cgroup v2 `cpu.max` file in CPUs; `None` when absent or `max`.
fn v2_quota(root: &Path, file: &Path) -> Result<Option<f64>, UtilisationError> {
    let Some(text) = read(root, file) else {
        return Ok(None);
    };
    let mut parts = text.split_whitespace();
    let (Some(max), period) = (parts.next(), parts.next()) else {
        return Err(parse_error(root, file, "empty".to_owned()));
    };
    if max == "max" {
        return Ok(None);
    }
    let quota: f64 = max
        .parse()
        .map_err(|_| parse_error(root, file, format!("bad quota {max:?}")))?;
    let period: f64 = period
        .unwrap_or("100000")
        .parse()
        .map_err(|_| parse_error(root, file, "bad period".to_owned()))?;
    if quota <= 0.0 || period <= 0.0 {
        return Err(parse_error(
            root,
            file,
            format!("quota {quota} / period {period} is no limit"),
        ));
    }
    Ok(Some(quota / period))
}

/// `(busy, idle)` jiffies of the aggregate `cpu` line of `/proc/stat`.
fn proc_times(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| fields.get(i).copied().unwrap_or(0);
    if fields.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    let idle = at(3) + at(4);
    Some((busy, idle))
}

/// The number of CPUs in a list such as `0-3,6,8-9`.
fn count_cpu_list(list: &str) -> Option<u32> {
    let mut count = 0u32;
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        count += match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                b.checked_sub(a)? + 1
            }
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    (count > 0).then_some(count)
}

fn exists(root: &Path, relative: &Path) -> bool {
    root.join(relative).is_file()
}

fn read(root: &Path, relative: &Path) -> Option<String> {
    std::fs::read_to_string(root.join(relative)).ok()
}

fn read_required(root: &Path, relative: &Path) -> Result<String, UtilisationError> {
    let path = root.join(relative);
    std::fs::read_to_string(&path).map_err(|source| UtilisationError::Read { path, source })
}

fn parse_i64(root: &Path, relative: &Path) -> Result<i64, UtilisationError> {
    let text = read_required(root, relative)?;
    text.trim().parse().map_err(|_| {
        parse_error(
            root,
            relative,
            format!("{:?} is not an integer", text.trim()),
        )
    })
}

fn parse_error(root: &Path, relative: &Path, reason: String) -> UtilisationError {
    UtilisationError::Parse {
        path: root.join(relative),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::Clock;
    use crate::test_util::ManualClock;

    /// A fresh fixture root under the system temp directory.
    struct Fixture(PathBuf);

    impl Fixture {
        fn new() -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "kcl-v3-util-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        fn write(&self, relative: &str, text: &str) {
            let path = self.0.join(relative);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const PROC_STAT_4: &str = "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 0 1 1 0 0 0 0\ncpu1 1 0 1 1 0 0 0 0\ncpu2 1 0 1 1 0 0 0 0\ncpu3 1 0 1 1 0 0 0 0\nintr 1\n";

    #[test]
    fn cgroup_v2_usage_over_the_smallest_quota() {
        let fx = Fixture::new();
        fx.write("proc/self/cgroup", "0::/kubepods/pod1/ctr\n");
        fx.write("proc/stat", PROC_STAT_4);
        fx.write("sys/fs/cgroup/cgroup.controllers", "cpu cpuset\n");
        fx.write("sys/fs/cgroup/kubepods/cpu.max", "max 100000\n");
        fx.write("sys/fs/cgroup/kubepods/pod1/cpu.max", "200000 100000\n");
        fx.write("sys/fs/cgroup/kubepods/pod1/ctr/cpu.max", "max 100000\n");
        fx.write(
            "sys/fs/cgroup/kubepods/pod1/ctr/cpu.stat",
            "usage_usec 1000000\nuser_usec 1\n",
        );
        let clock = ManualClock::new();
        let mut s = CpuSampler::detect(&fx.0).unwrap();
        assert_eq!(s.kind(), CpuSourceKind::CgroupV2);
        assert_eq!(
            s.cpu_limit().unwrap(),
            2.0,
            "the pod's 2-CPU quota caps the container"
        );
        assert_eq!(
            s.sample(clock.now()).unwrap(),
            None,
            "first sample: nothing to compare"
        );
        // 1 CPU-second used in 1 s of a 2-CPU quota: 50 %.
        clock.advance(Duration::from_secs(1));
        fx.write(
            "sys/fs/cgroup/kubepods/pod1/ctr/cpu.stat",
            "usage_usec 2000000\n",
        );
        assert_eq!(s.sample(clock.now()).unwrap(), Some(50.0));
        // More than the quota (rounding, bursts) is clamped.
        clock.advance(Duration::from_secs(1));
        fx.write(
            "sys/fs/cgroup/kubepods/pod1/ctr/cpu.stat",
            "usage_usec 5000000\n",
        );
        assert_eq!(s.sample(clock.now()).unwrap(), Some(100.0));
        // A counter that went back (cgroup recreated) restarts the comparison.
        clock.advance(Duration::from_secs(1));
        fx.write(
            "sys/fs/cgroup/kubepods/pod1/ctr/cpu.stat",
            "usage_usec 10\n",
        );
        assert_eq!(s.sample(clock.now()).unwrap(), None);
        // A changed quota is followed.
        fx.write("sys/fs/cgroup/kubepods/pod1/cpu.max", "50000 100000\n");
        assert_eq!(s.cpu_limit().unwrap(), 0.5);
    }

    #[test]
    fn cgroup_v2_in_a_namespace_without_quota_uses_the_cpuset() {
        let fx = Fixture::new();
        fx.write("proc/self/cgroup", "0::/\n");
        fx.write("proc/stat", PROC_STAT_4);
        fx.write("sys/fs/cgroup/cgroup.controllers", "cpu\n");
        fx.write("sys/fs/cgroup/cpu.max", "max 100000\n");
        fx.write("sys/fs/cgroup/cpuset.cpus.effective", "0-2,5\n");
        fx.write("sys/fs/cgroup/cpu.stat", "usage_usec 0\n");
        let s = CpuSampler::detect(&fx.0).unwrap();
        assert_eq!(s.cpu_limit().unwrap(), 4.0);
        // Without a cpuset: the CPUs of /proc/stat.
        std::fs::remove_file(fx.0.join("sys/fs/cgroup/cpuset.cpus.effective")).unwrap();
        assert_eq!(s.cpu_limit().unwrap(), 4.0);
        fx.write("sys/fs/cgroup/cpu.max", "garbage\n");
        assert!(matches!(s.cpu_limit(), Err(UtilisationError::Parse { .. })));
    }

    #[test]
    fn cgroup_v1_nanoseconds_over_the_cfs_quota() {
        let fx = Fixture::new();
        fx.write(
            "proc/self/cgroup",
            "4:cpu,cpuacct:/docker/abc\n3:cpuset:/docker/abc\n",
        );
        fx.write("proc/stat", PROC_STAT_4);
        fx.write("sys/fs/cgroup/cpu,cpuacct/docker/abc/cpuacct.usage", "0\n");
        fx.write(
            "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us",
            "150000\n",
        );
        fx.write(
            "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us",
            "100000\n",
        );
        let clock = ManualClock::new();
        let mut s = CpuSampler::detect(&fx.0).unwrap();
        assert_eq!(s.kind(), CpuSourceKind::CgroupV1);
        assert_eq!(s.cpu_limit().unwrap(), 1.5);
        assert_eq!(s.sample(clock.now()).unwrap(), None);
        clock.advance(Duration::from_secs(2));
        fx.write(
            "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpuacct.usage",
            "1500000000\n",
        );
        assert_eq!(s.sample(clock.now()).unwrap(), Some(50.0));
        // No quota (-1): the cpuset's CPUs.
        fx.write(
            "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us",
            "-1\n",
        );
        fx.write(
            "sys/fs/cgroup/cpuset/docker/abc/cpuset.effective_cpus",
            "0-1\n",
        );
        assert_eq!(s.cpu_limit().unwrap(), 2.0);
        fx.write(
            "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpuacct.usage",
            "lots\n",
        );
        assert!(matches!(
            s.sample(clock.now()),
            Err(UtilisationError::Parse { .. })
        ));
    }

    #[test]
    fn proc_stat_counts_iowait_as_idle() {
        let fx = Fixture::new();
        fx.write("proc/stat", "cpu  100 0 100 800 0 0 0 0\ncpu0 1 1 1 1\n");
        let clock = ManualClock::new();
        let mut s = CpuSampler::detect(&fx.0).unwrap();
        assert_eq!(s.kind(), CpuSourceKind::ProcStat);
        assert_eq!(s.cpu_limit().unwrap(), 1.0);
        assert_eq!(s.sample(clock.now()).unwrap(), None);
        // +150 busy (user 100, nice 10, system 20, irq 10, softirq 5, steal 5), +250 idle (idle 200, iowait 50).
        fx.write("proc/stat", "cpu  200 10 120 1000 50 10 5 5\n");
        assert_eq!(s.sample(clock.now()).unwrap(), Some(37.5));
        // Nothing moved: no value.
        assert_eq!(s.sample(clock.now()).unwrap(), None);
        fx.write("proc/stat", "intr 5\n");
        assert!(matches!(
            s.sample(clock.now()),
            Err(UtilisationError::Parse { .. })
        ));
        std::fs::remove_file(fx.0.join("proc/stat")).unwrap();
        assert!(matches!(
            s.sample(clock.now()),
            Err(UtilisationError::Read { .. })
        ));
    }

    #[test]
    fn nothing_found_is_a_clear_error() {
        let fx = Fixture::new();
        let err = CpuSampler::detect(&fx.0).unwrap_err();
        assert!(matches!(err, UtilisationError::NoSource { .. }));
        assert!(err.to_string().contains("no CPU accounting"));
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0-7"), Some(8));
        assert_eq!(count_cpu_list("0-4,6,8-10"), Some(9));
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
        assert_eq!(count_cpu_list(""), None);
    }
}
