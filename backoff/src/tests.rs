use std::time::Duration;

use super::*;

const MS: Duration = Duration::from_millis(1);

fn policy(max_attempts: Option<u32>, jitter: bool) -> BackoffPolicy {
    BackoffPolicy { initial: 10 * MS, max: 100 * MS, max_attempts, jitter }
}

#[test]
fn delays_double_up_to_the_cap() {
    let mut b = policy(None, false).start();
    let delays: Vec<Duration> = (0..6).map(|_| b.next_delay().expect("unbounded")).collect();
    assert_eq!(delays, [10 * MS, 20 * MS, 40 * MS, 80 * MS, 100 * MS, 100 * MS]);
    assert_eq!(b.failures(), 6);
}

#[test]
fn a_success_starts_over() {
    let mut b = policy(None, false).start();
    b.next_delay().expect("first");
    b.next_delay().expect("second");
    b.reset();
    assert_eq!(b.next_delay(), Ok(10 * MS));
}

#[test]
fn attempts_run_out() {
    let mut b = policy(Some(3), false).start();
    for _ in 0..3 {
        assert!(b.next_delay().is_ok());
    }
    assert_eq!(b.next_delay(), Err(Exhausted { failures: 3 }));
    assert_eq!(Exhausted { failures: 3 }.to_string(), "gave up after 3 attempts");
}

#[test]
fn jitter_stays_within_half_and_whole() {
    let mut b = policy(None, true).start();
    for expected in [10 * MS, 20 * MS, 40 * MS, 80 * MS, 100 * MS, 100 * MS] {
        let d = b.next_delay().expect("unbounded");
        assert!(d >= expected / 2 && d <= expected, "{d:?} outside [{:?}, {expected:?}]", expected / 2);
    }
}

#[test]
fn huge_failure_counts_do_not_overflow() {
    let mut b = BackoffPolicy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(30),
        max_attempts: None,
        jitter: false,
    }
    .start();
    for _ in 0..100 {
        assert!(b.next_delay().expect("unbounded") <= Duration::from_secs(30));
    }
}
