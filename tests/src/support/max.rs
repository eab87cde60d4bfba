//! `net.netfilter.nf_conntrack_max` is global to the machine: tests and the benchmark that
//! change it hold a guard that puts the old value back on drop, panics included.

const PATH: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

pub struct ConntrackMax(String);

impl ConntrackMax {
    fn read() -> String {
        std::fs::read_to_string(PATH)
            .expect("read nf_conntrack_max")
            .trim()
            .to_string()
    }

    /// Sets the max to `to`.
    pub fn set(to: u64) -> ConntrackMax {
        let old = Self::read();
        std::fs::write(PATH, to.to_string()).expect("write nf_conntrack_max");
        ConntrackMax(old)
    }

    /// Raises the max to at least `to`; leaves a larger one alone.
    pub fn raise(to: u64) -> ConntrackMax {
        let old = Self::read();
        if old.parse::<u64>().unwrap_or(0) < to {
            std::fs::write(PATH, to.to_string()).expect("write nf_conntrack_max");
        }
        ConntrackMax(old)
    }
}

impl Drop for ConntrackMax {
    fn drop(&mut self) {
        let _ = std::fs::write(PATH, &self.0);
    }
}
