//! The 2.x-mode leader of the Java KCL (`DeterministicShuffleShardSyncLeaderDecider`),
//! which in `CLIENT_VERSION_UPGRADE_FROM_2X` is also the worker that checks whether the
//! fleet is ready for 3.x and flips the application: the distinct lease owners, sorted,
//! shuffled by `java.util.Collections.shuffle` with `new java.util.Random(1947)`; the
//! first one leads. With no owner at all every worker considers itself the leader (as the
//! Java KCL does while its set of leaders is empty).
//!
//! Reproduced here bit for bit (Java's 48-bit linear congruential generator and its
//! `nextInt(bound)`), so that a Rust and a Java worker reading the same table agree on
//! the leader. Java sorts strings by UTF-16 code units, and so do we.

/// The seed of the Java KCL's shuffle.
pub const DETERMINISTIC_SHUFFLE_SEED: i64 = 1947;

/// `java.util.Random`: the 48-bit linear congruential generator.
#[derive(Clone, Debug)]
pub struct JavaRandom {
    seed: u64,
}

const MULTIPLIER: u64 = 0x5_DEEC_E66D;
const MASK: u64 = (1 << 48) - 1;

impl JavaRandom {
    /// `new Random(seed)`.
    pub fn new(seed: i64) -> Self {
        Self {
            seed: (seed as u64 ^ MULTIPLIER) & MASK,
        }
    }

    fn next(&mut self, bits: u32) -> i32 {
        self.seed = (self.seed.wrapping_mul(MULTIPLIER).wrapping_add(0xB)) & MASK;
        // The top `bits` of the 48, as Java's `(int) (seed >>> (48 - bits))`.
        (self.seed >> (48 - bits)) as u32 as i32
    }

    /// `nextInt(bound)` for `bound > 0` (0 otherwise).
    pub fn next_int(&mut self, bound: i32) -> i32 {
        if bound <= 0 {
            return 0;
        }
        let mut r = self.next(31);
        let m = bound - 1;
        if bound & m == 0 {
            return ((i64::from(bound) * i64::from(r)) >> 31) as i32;
        }
        let mut u = r;
        loop {
            r = u % bound;
            if u.wrapping_sub(r).wrapping_add(m) >= 0 {
                return r;
            }
            u = self.next(31);
        }
    }
}

/// `Collections.shuffle(list, rnd)` for a random-access list.
pub fn java_shuffle<T>(items: &mut [T], random: &mut JavaRandom) {
    let mut i = items.len();
    while i > 1 {
        let j = random.next_int(i32::try_from(i).unwrap_or(i32::MAX));
        items.swap(i - 1, usize::try_from(j).unwrap_or(0));
        i -= 1;
    }
}

/// The leader the Java KCL's 2.x election picks from these lease owners (`None` when there
/// is no owner: then every worker leads).
pub fn deterministic_shuffle_leader<'a>(
    owners: impl IntoIterator<Item = Option<&'a str>>,
) -> Option<String> {
    let mut hosts: Vec<&str> = owners.into_iter().flatten().collect();
    hosts.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
    hosts.dedup();
    let mut random = JavaRandom::new(DETERMINISTIC_SHUFFLE_SEED);
    java_shuffle(&mut hosts, &mut random);
    hosts.first().map(|h| (*h).to_owned())
}

/// Whether `me` leads by that rule (true when nobody owns a lease).
pub fn is_2x_leader<'a>(me: &str, owners: impl IntoIterator<Item = Option<&'a str>>) -> bool {
    deterministic_shuffle_leader(owners).is_none_or(|leader| leader == me)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_random_matches_the_jdk() {
        // `new Random(42).nextInt(10)` x5 and `new Random(1947).nextInt(2..5)` from the JDK.
        let mut r = JavaRandom::new(42);
        let got: Vec<i32> = (0..5).map(|_| r.next_int(10)).collect();
        assert_eq!(got, vec![0, 3, 8, 4, 0]);
        let mut r = JavaRandom::new(0);
        assert_eq!(r.next_int(100), 60);
        let mut r = JavaRandom::new(1947);
        let got: Vec<i32> = [8, 7, 6, 5, 4, 3, 2]
            .iter()
            .map(|b| r.next_int(*b))
            .collect();
        assert_eq!(got, vec![5, 1, 5, 4, 1, 0, 1]);
    }

    #[test]
    fn leaders_match_the_java_kcl() {
        // The first of `Collections.shuffle(sorted, new Random(1947))`, printed by the JDK 17.
        let cases: [(&[&str], &str); 5] = [
            (&["a", "b"], "a"),
            (&["a", "b", "c"], "c"),
            (
                &["worker-0", "worker-1", "worker-2", "worker-3"],
                "worker-3",
            ),
            (&["rust-1", "java-1"], "java-1"),
            (&["java-a", "rust-b", "rust-c", "java-d", "x"], "x"),
        ];
        for (owners, leader) in cases {
            assert_eq!(
                deterministic_shuffle_leader(owners.iter().map(|o| Some(*o))).as_deref(),
                Some(leader),
                "{owners:?}"
            );
        }
    }

    #[test]
    fn no_owner_means_everyone_leads_and_one_owner_leads_alone() {
        assert!(is_2x_leader("a", [None, None]));
        assert!(is_2x_leader("a", [Some("a"), None]));
        assert!(!is_2x_leader("b", [Some("a")]));
        assert_eq!(
            deterministic_shuffle_leader([Some("b"), Some("a"), Some("b")]).as_deref(),
            deterministic_shuffle_leader([Some("a"), Some("b")]).as_deref()
        );
    }
}
