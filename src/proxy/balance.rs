//! Which target of an upstream a request goes to: `balance` and `weights`.
//!
//! - `round_robin` (default): targets in turn, in proportion to their
//!   weights, interleaved (nginx's smooth weighted round robin, computed once
//!   at config load into a schedule the request path walks with one atomic
//!   add).
//! - `least_outstanding`: power of two choices: two targets drawn at random
//!   (by weight), the one with fewer requests outstanding per unit of weight
//!   wins. Cheaper than scanning every target, and it avoids the herd a
//!   global minimum causes when many workers see the same numbers.
//! - `client_hash`: rendezvous (highest random weight) hashing on the API
//!   client's ID (the client's IP on public routes): a client stays on one
//!   target while the set is stable, and removing one of N targets moves
//!   only the clients it had, about 1/N. The hash is fixed (not seeded per
//!   process), so every gateway instance sends a client to the same target.
//!
//! Every policy skips targets out of rotation (see `health.rs`) and those a
//! retry already tried. When none is left in rotation, the least recently
//! failed target is used anyway (panic mode, as Envoy does): a guess beats
//! answering 502 to everyone when the health data may be what is wrong.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::time::Instant;

use super::health::{PassiveSettings, TargetHealth};

/// `balance` on an `[upstream.NAME]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    #[default]
    RoundRobin,
    LeastOutstanding,
    ClientHash,
}

impl Policy {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "round_robin" => Some(Self::RoundRobin),
            "least_outstanding" => Some(Self::LeastOutstanding),
            "client_hash" => Some(Self::ClientHash),
            _ => None,
        }
    }
}

/// Whom a request is for, for `client_hash`: hashed only by that policy.
#[derive(Debug, Clone, Copy)]
pub struct Affinity<'a> {
    pub client: Option<&'a str>,
    pub ip: IpAddr,
}

impl Affinity<'_> {
    fn hash(&self) -> u64 {
        match self.client {
            Some(client) => stable_hash(client.as_bytes()),
            None => match self.ip {
                IpAddr::V4(ip) => stable_hash(&ip.octets()),
                IpAddr::V6(ip) => stable_hash(&ip.octets()),
            },
        }
    }
}

/// What the balancer sees of one target.
pub trait Weighted {
    fn health(&self) -> &TargetHealth;
    /// `weights[i]`: its share of requests (0: none).
    fn weight(&self) -> u32;
    /// [`stable_hash`] of the target's `scheme://host:port`.
    fn name_hash(&self) -> u64;
}

/// The choice made: the target's index, and whether it was a panic pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub index: usize,
    pub panic: bool,
}

/// One upstream's policy and its state.
pub struct Balancer {
    policy: Policy,
    /// Target indices in smooth weighted round-robin order (each index
    /// appears `weight / gcd` times); `least_outstanding` draws from it too,
    /// which makes its draws weighted.
    schedule: Box<[usize]>,
    next: AtomicUsize,
    /// Every target has the same weight: `client_hash` compares raw hashes.
    equal_weights: bool,
}

impl Balancer {
    pub fn new(policy: Policy, weights: &[u32]) -> Self {
        let equal_weights = weights.windows(2).all(|pair| pair[0] == pair[1]);
        Self { policy, schedule: smooth_schedule(weights), next: AtomicUsize::new(0), equal_weights }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Picks a target for one attempt, skipping the indices in `tried`;
    /// `None` when every target with a weight was tried.
    pub fn pick(
        &self,
        targets: &[impl Weighted],
        affinity: Affinity<'_>,
        tried: &[usize],
        now: Instant,
        passive: &PassiveSettings,
    ) -> Option<Pick> {
        let usable = |i: usize| !tried.contains(&i) && targets[i].weight() > 0;
        let chosen = match self.policy {
            Policy::RoundRobin => self.round_robin(targets, &usable, !tried.is_empty(), now, passive),
            Policy::LeastOutstanding => self.least_outstanding(targets, &usable, now, passive),
            Policy::ClientHash => {
                client_hash(targets, affinity.hash(), self.equal_weights, &usable, now, passive)
            }
        };
        match chosen {
            Some(index) => Some(Pick { index, panic: false }),
            // Panic mode: the least recently failed of the rest (never
            // failed counts as least recently).
            None => (0..targets.len())
                .filter(|&i| usable(i))
                .min_by_key(|&i| targets[i].health().last_failure())
                .map(|index| Pick { index, panic: true }),
        }
    }

    fn round_robin(
        &self,
        targets: &[impl Weighted],
        usable: &impl Fn(usize) -> bool,
        retry: bool,
        now: Instant,
        passive: &PassiveSettings,
    ) -> Option<usize> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        // A retry does not take a turn: if it did, with two targets a failing
        // one would get every request's first attempt (turn 2n), not half.
        let start =
            if retry { self.next.load(Ordering::Relaxed) } else { self.next.fetch_add(1, Ordering::Relaxed) };
        (0..len)
            .map(|step| self.schedule[start.wrapping_add(step) % len])
            .find(|&i| usable(i) && targets[i].health().claim(now, passive))
    }

    fn least_outstanding(
        &self,
        targets: &[impl Weighted],
        usable: &impl Fn(usize) -> bool,
        now: Instant,
        passive: &PassiveSettings,
    ) -> Option<usize> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        let first = self.schedule[fastrand::usize(..len)];
        let mut second = self.schedule[fastrand::usize(..len)];
        if second == first && targets.len() > 1 {
            // Two draws of the same target compare nothing: draw once more
            // among the others, uniformly.
            second = (first + 1 + fastrand::usize(..targets.len() - 1)) % targets.len();
        }
        let healthy = |i: usize| usable(i) && targets[i].health().selectable(now);
        let lighter = |a: usize, b: usize| {
            // (outstanding + 1) / weight, compared without dividing.
            let load = |i: usize| targets[i].health().outstanding() as u64 + 1;
            let weight = |i: usize| u64::from(targets[i].weight());
            if load(a) * weight(b) <= load(b) * weight(a) { a } else { b }
        };
        let drawn = match (healthy(first), healthy(second)) {
            (true, true) => Some(lighter(first, second)),
            (true, false) => Some(first),
            (false, true) => Some(second),
            // Both out: the lightest of those in rotation, by a full scan
            // (rare: only while targets are out).
            (false, false) => (0..targets.len()).filter(|&i| healthy(i)).reduce(lighter),
        };
        match drawn {
            Some(i) if targets[i].health().claim(now, passive) => Some(i),
            // A trial someone else took: any other in rotation.
            _ => (0..targets.len())
                .filter(|&i| healthy(i) && Some(i) != drawn)
                .reduce(lighter)
                .filter(|&i| targets[i].health().claim(now, passive)),
        }
    }
}

/// Highest random weight: each target scores `weight / -ln(u)`, `u` from a
/// hash of (client, target); the best score in rotation wins. Equal weights
/// compare the hashes themselves (same order, no floating point).
fn client_hash(
    targets: &[impl Weighted],
    client: u64,
    equal: bool,
    usable: &impl Fn(usize) -> bool,
    now: Instant,
    passive: &PassiveSettings,
) -> Option<usize> {
    let score = |i: usize| -> f64 {
        let h = mix(client ^ targets[i].name_hash());
        if equal {
            return h as f64;
        }
        // 53 random bits as a float in (0, 1).
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        f64::from(targets[i].weight()) / -u.ln()
    };
    // The client's own target, found without allocating: the common case.
    let best = (0..targets.len()).filter(|&i| usable(i)).max_by(|&a, &b| score(a).total_cmp(&score(b)))?;
    if targets[best].health().claim(now, passive) {
        return Some(best);
    }
    // It is out: the next in the client's own order, so the fallback is
    // sticky too.
    let mut ranked: Vec<(f64, usize)> =
        (0..targets.len()).filter(|&i| usable(i)).map(|i| (score(i), i)).collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    ranked
        .into_iter()
        .map(|(_, i)| i)
        .filter(|&i| i != best)
        .find(|&i| targets[i].health().claim(now, passive))
}

/// FNV-1a, then [`mix`]: fixed, so every process agrees.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    mix(hash)
}

/// splitmix64's finaliser: spreads every input bit over the output.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// nginx's smooth weighted round robin, run once over a whole cycle: with
/// weights 5, 1, 1 the order is a a b a c a a, not a a a a a b c.
fn smooth_schedule(weights: &[u32]) -> Box<[usize]> {
    let divisor = weights.iter().copied().filter(|&w| w > 0).reduce(gcd).unwrap_or(1);
    let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w / divisor)).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let Some((best, _)) = current
            .iter()
            .enumerate()
            .filter(|(i, _)| weights[*i] > 0)
            .max_by_key(|(i, c)| (**c, -(*i as i64)))
        else {
            break;
        };
        current[best] -= total;
        schedule.push(best);
    }
    schedule.into_boxed_slice()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;

    struct Candidate<'a> {
        health: &'a TargetHealth,
        weight: u32,
        name_hash: u64,
    }

    impl Weighted for Candidate<'_> {
        fn health(&self) -> &TargetHealth {
            self.health
        }
        fn weight(&self) -> u32 {
            self.weight
        }
        fn name_hash(&self) -> u64 {
            self.name_hash
        }
    }

    struct Set {
        health: Vec<Arc<TargetHealth>>,
        weights: Vec<u32>,
        names: Vec<String>,
    }

    impl Set {
        fn new(test: &str, weights: &[u32]) -> Self {
            let names: Vec<String> = (0..weights.len()).map(|i| format!("http://10.0.0.{i}:80")).collect();
            let health = names.iter().map(|n| TargetHealth::new(test, n)).collect();
            Self { health, weights: weights.to_vec(), names }
        }

        fn candidates(&self) -> Vec<Candidate<'_>> {
            (0..self.names.len())
                .map(|i| Candidate {
                    health: &self.health[i],
                    weight: self.weights[i],
                    name_hash: stable_hash(self.names[i].as_bytes()),
                })
                .collect()
        }
    }

    fn nobody() -> Affinity<'static> {
        Affinity { client: None, ip: IpAddr::from([127, 0, 0, 1]) }
    }

    fn eject(health: &TargetHealth, passive: &PassiveSettings) {
        for _ in 0..passive.failures {
            health.record(super::super::health::Outcome::Failure, Instant::now(), passive, "t");
        }
    }

    #[test]
    fn the_schedule_interleaves_by_weight() {
        assert_eq!(&*smooth_schedule(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(&*smooth_schedule(&[1, 1, 1]), [0, 1, 2]);
        assert_eq!(&*smooth_schedule(&[20, 10]), [0, 1, 0], "reduced by the gcd");
        assert_eq!(&*smooth_schedule(&[0, 2]), [1], "weight 0 never comes up");
    }

    #[test]
    fn round_robin_follows_weights_and_skips_ejected_targets() {
        let set = Set::new("balance-rr", &[2, 1, 1]);
        let balancer = Balancer::new(Policy::RoundRobin, &set.weights);
        let passive = PassiveSettings::default();
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts
                [balancer.pick(&set.candidates(), nobody(), &[], Instant::now(), &passive).unwrap().index] +=
                1;
        }
        assert_eq!(counts, [200, 100, 100]);
        eject(&set.health[0], &passive);
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts
                [balancer.pick(&set.candidates(), nobody(), &[], Instant::now(), &passive).unwrap().index] +=
                1;
        }
        assert_eq!(counts[0], 0, "ejected");
        assert_eq!(counts[1] + counts[2], 400);
        let retry = balancer.pick(&set.candidates(), nobody(), &[1], Instant::now(), &passive).unwrap();
        assert_eq!(retry, Pick { index: 2, panic: false }, "a retry never goes back to a tried target");
    }

    #[test]
    fn a_retry_takes_no_turn_so_a_failing_target_keeps_its_share_of_first_attempts() {
        let set = Set::new("balance-rr-retry", &[1, 1]);
        let balancer = Balancer::new(Policy::RoundRobin, &set.weights);
        let passive = PassiveSettings { failures: 0, ..PassiveSettings::default() };
        let mut first_attempts = [0; 2];
        for _ in 0..10 {
            let first = balancer.pick(&set.candidates(), nobody(), &[], Instant::now(), &passive).unwrap();
            first_attempts[first.index] += 1;
            if first.index == 0 {
                // Target 0 always fails: the request is retried on 1.
                let retry =
                    balancer.pick(&set.candidates(), nobody(), &[0], Instant::now(), &passive).unwrap();
                assert_eq!(retry.index, 1);
            }
        }
        assert_eq!(first_attempts, [5, 5]);
    }

    #[test]
    fn with_every_target_out_the_least_recently_failed_one_is_tried() {
        let set = Set::new("balance-panic", &[1, 1, 1]);
        let balancer = Balancer::new(Policy::RoundRobin, &set.weights);
        let passive = PassiveSettings::default();
        for i in [1, 2, 0] {
            eject(&set.health[i], &passive);
            // Distinct failure times, whatever the clock's resolution.
            std::thread::sleep(std::time::Duration::from_millis(3));
        }
        let pick = balancer.pick(&set.candidates(), nobody(), &[], Instant::now(), &passive).unwrap();
        assert_eq!(pick, Pick { index: 1, panic: true });
        let pick = balancer.pick(&set.candidates(), nobody(), &[1], Instant::now(), &passive).unwrap();
        assert_eq!(pick, Pick { index: 2, panic: true });
        assert_eq!(balancer.pick(&set.candidates(), nobody(), &[0, 1, 2], Instant::now(), &passive), None);
    }

    #[test]
    fn least_outstanding_avoids_the_busy_target() {
        let set = Set::new("balance-lo", &[1, 1, 1]);
        let balancer = Balancer::new(Policy::LeastOutstanding, &set.weights);
        let passive = PassiveSettings::default();
        let _busy: Vec<_> = (0..5).map(|_| set.health[0].start_request()).collect();
        for _ in 0..500 {
            let pick = balancer.pick(&set.candidates(), nobody(), &[], Instant::now(), &passive).unwrap();
            assert_ne!(pick.index, 0, "the target with 5 outstanding lost every draw it was in");
        }
        // Weights: a target with twice the weight may carry twice the load.
        let set = Set::new("balance-lo-w", &[2, 1]);
        let balancer = Balancer::new(Policy::LeastOutstanding, &set.weights);
        let _on_both = [set.health[0].start_request(), set.health[1].start_request()];
        for _ in 0..100 {
            let pick = balancer.pick(&set.candidates(), nobody(), &[], Instant::now(), &passive).unwrap();
            assert_eq!(pick.index, 0, "(1+1)/2 beats (1+1)/1");
        }
    }

    #[test]
    fn client_hash_is_sticky_and_moves_about_one_in_n_when_a_target_goes() {
        let passive = PassiveSettings::default();
        let five = Set::new("balance-hash-5", &[1, 1, 1, 1, 1]);
        let balancer = Balancer::new(Policy::ClientHash, &five.weights);
        let clients: Vec<String> = (0..10_000).map(|i| format!("client-{i}")).collect();
        let place = |set: &Set, balancer: &Balancer, client: &str| {
            let affinity = Affinity { client: Some(client), ip: IpAddr::from([127, 0, 0, 1]) };
            let pick = balancer.pick(&set.candidates(), affinity, &[], Instant::now(), &passive).unwrap();
            set.names[pick.index].clone()
        };
        let before: HashMap<&str, String> =
            clients.iter().map(|c| (c.as_str(), place(&five, &balancer, c))).collect();
        for client in clients.iter().take(100) {
            assert_eq!(place(&five, &balancer, client), before[client.as_str()], "sticky");
        }
        let mut per_target: HashMap<&String, usize> = HashMap::new();
        for target in before.values() {
            *per_target.entry(target).or_default() += 1;
        }
        for (target, n) in &per_target {
            assert!((1700..2300).contains(n), "{target} has {n} of 10000 clients");
        }

        // The last target removed from the config: only its clients move.
        let four =
            Set { health: five.health[..4].to_vec(), weights: vec![1; 4], names: five.names[..4].to_vec() };
        let balancer = Balancer::new(Policy::ClientHash, &four.weights);
        let mut moved = 0;
        for client in &clients {
            let now = place(&four, &balancer, client);
            if now != before[client.as_str()] {
                assert_eq!(before[client.as_str()], five.names[4], "{client} moved off a target that stayed");
                moved += 1;
            }
        }
        assert!((1700..2300).contains(&moved), "{moved} of 10000 clients moved; about 1/5 expected");

        // Ejected rather than removed: the same clients move, and come back.
        eject(&five.health[4], &passive);
        let balancer = Balancer::new(Policy::ClientHash, &five.weights);
        for client in clients.iter().take(500) {
            let expected = place(&four, &Balancer::new(Policy::ClientHash, &four.weights), client);
            assert_eq!(place(&five, &balancer, client), expected);
        }
    }

    #[test]
    fn client_hash_weights_shift_the_share() {
        let set = Set::new("balance-hash-w", &[3, 1]);
        let balancer = Balancer::new(Policy::ClientHash, &set.weights);
        let passive = PassiveSettings::default();
        let mut first = 0;
        for i in 0..8000 {
            let client = format!("c{i}");
            let affinity = Affinity { client: Some(&client), ip: IpAddr::from([127, 0, 0, 1]) };
            if balancer.pick(&set.candidates(), affinity, &[], Instant::now(), &passive).unwrap().index == 0 {
                first += 1;
            }
        }
        assert!((5700..6300).contains(&first), "weight 3 of 4 took {first} of 8000");
    }
}
