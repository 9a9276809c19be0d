//! The coordinator against a real etcd (Debian's `etcd-server`, installed by images/setup-host).
//! Each test starts its own etcd on free loopback ports with a temporary data directory and
//! kills it at the end. Without etcd the tests fail, saying what to install.

use std::net::{SocketAddr, TcpListener};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use replicator::coordinator::{
    member_key, owner_key, Claim, Coordinator, CoordinatorError, Endpoints, EtcdCoordinator,
    Member, MemoryCoordinator, Ownership,
};

#[path = "support/etcd.rs"]
mod etcd;
use etcd::{free_port, Etcd};

fn own(owner: &str, term: u64) -> Ownership {
    Ownership {
        owner: owner.into(),
        term,
    }
}

#[test]
fn first_claim_creates_term_1() {
    let etcd = Etcd::start();
    let c = etcd.coordinator();
    assert_eq!(c.current("vm1").unwrap(), None);
    assert_eq!(
        c.claim("vm1", None, "host-a").unwrap(),
        Claim::Won(own("host-a", 1))
    );
    let (current, revision) = c.current("vm1").unwrap().expect("an owner");
    assert_eq!(current, own("host-a", 1));
    assert!(revision > 0);
    // Creating again loses to the first creator.
    assert_eq!(
        c.claim("vm1", None, "host-b").unwrap(),
        Claim::Lost(own("host-a", 1))
    );
    // Other VMs are independent.
    assert_eq!(c.current("vm2").unwrap(), None);
}

#[test]
fn contenders_from_the_same_read_exactly_one_wins() {
    const ROUNDS: u64 = 50;
    const CONTENDERS: usize = 3;
    let etcd = Etcd::start();
    let contenders: Vec<EtcdCoordinator> = (0..CONTENDERS).map(|_| etcd.coordinator()).collect();
    let reader = etcd.coordinator();
    for round in 0..ROUNDS {
        let expected = reader.current("vm").unwrap().map(|(o, _)| o);
        assert_eq!(expected.as_ref().map_or(0, |o| o.term), round);
        let barrier = Barrier::new(CONTENDERS);
        let claims: Vec<Claim> = std::thread::scope(|s| {
            let handles: Vec<_> = contenders
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (barrier, expected) = (&barrier, expected.as_ref());
                    s.spawn(move || {
                        barrier.wait();
                        c.claim("vm", expected, &format!("host-{i}")).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<&Ownership> = claims
            .iter()
            .filter_map(|c| match c {
                Claim::Won(o) => Some(o),
                Claim::Lost(_) => None,
            })
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {claims:?}");
        let winner = winners[0];
        assert_eq!(winner.term, round + 1, "round {round}");
        // Every loser learned the winner, and the winner is what etcd holds.
        for c in &claims {
            assert_eq!(c.ownership(), winner, "round {round}: {claims:?}");
        }
        assert_eq!(reader.current("vm").unwrap().unwrap().0, *winner);
    }
}

#[test]
fn a_stale_claimer_loses_and_learns_the_current_owner() {
    let etcd = Etcd::start();
    let (a, b) = (etcd.coordinator(), etcd.coordinator());
    let t1 = a.claim("vm", None, "host-a").unwrap();
    assert!(t1.won());
    // b reads term 1 and is promoted to term 2.
    let read = b.current("vm").unwrap().unwrap().0;
    assert_eq!(
        b.claim("vm", Some(&read), "host-b").unwrap(),
        Claim::Won(own("host-b", 2))
    );
    // a, still believing in term 1, tries to go on unprotected: it loses and learns b.
    assert_eq!(
        a.claim("vm", Some(t1.ownership()), "host-a").unwrap(),
        Claim::Lost(own("host-b", 2))
    );
    // So does a claimer that read nothing at all.
    assert_eq!(
        a.claim("vm", None, "host-c").unwrap(),
        Claim::Lost(own("host-b", 2))
    );
    // From the current ownership, a wins term 3.
    assert_eq!(
        a.claim("vm", Some(&own("host-b", 2)), "host-a").unwrap(),
        Claim::Won(own("host-a", 3))
    );
    // A claim expecting an owner of a VM nobody owns is an error, not a creation.
    let err = a
        .claim("nobody", Some(&own("host-a", 1)), "host-a")
        .unwrap_err();
    assert!(matches!(err, CoordinatorError::Vanished { .. }), "{err}");
}

#[test]
fn still_owner_follows_the_term() {
    let etcd = Etcd::start();
    let c = etcd.coordinator();
    assert!(
        !c.still_owner("vm", &own("host-a", 1)).unwrap(),
        "nobody owns it yet"
    );
    let t1 = c.claim("vm", None, "host-a").unwrap().ownership().clone();
    assert!(c.still_owner("vm", &t1).unwrap());
    assert!(
        !c.still_owner("vm", &own("host-b", 1)).unwrap(),
        "same term, other owner"
    );
    let t2 = c
        .claim("vm", Some(&t1), "host-b")
        .unwrap()
        .ownership()
        .clone();
    assert!(
        !c.still_owner("vm", &t1).unwrap(),
        "the old primary is deposed"
    );
    assert!(c.still_owner("vm", &t2).unwrap());
    // The same host winning a new term (a primary going on unprotected) deposes its old term.
    let t3 = c
        .claim("vm", Some(&t2), "host-b")
        .unwrap()
        .ownership()
        .clone();
    assert_eq!(t3, own("host-b", 3));
    assert!(!c.still_owner("vm", &t2).unwrap());
    assert!(c.still_owner("vm", &t3).unwrap());
}

/// Every call to an unreachable coordinator fails with a one-line error within the timeout.
fn assert_unreachable(endpoints: &Endpoints, what: &str) {
    let timeout = Duration::from_millis(300);
    let c = EtcdCoordinator::connect(endpoints, timeout).expect("connecting is lazy");
    type Call<'a> = Box<dyn Fn() -> Result<(), CoordinatorError> + 'a>;
    let calls: [(&str, Call); 3] = [
        ("current", Box::new(|| c.current("vm").map(drop))),
        (
            "claim",
            Box::new(|| c.claim("vm", None, "host-a").map(drop)),
        ),
        (
            "still_owner",
            Box::new(|| c.still_owner("vm", &own("host-a", 1)).map(drop)),
        ),
    ];
    for (name, call) in calls {
        let start = Instant::now();
        let err = call().expect_err("an unreachable coordinator answered");
        let elapsed = start.elapsed();
        let text = err.to_string();
        println!("{what}, {name}: {elapsed:?}: {text}");
        assert!(
            matches!(err, CoordinatorError::Unreachable { .. }),
            "{what}, {name}: {text}"
        );
        assert!(!text.contains('\n'), "{what}, {name}: not one line: {text}");
        assert!(
            text.contains(&endpoints.to_string()),
            "{what}, {name}: {text}"
        );
        assert!(text.contains("unreachable"), "{what}, {name}: {text}");
        assert!(
            elapsed < timeout + Duration::from_millis(500),
            "{what}, {name}: took {elapsed:?}"
        );
    }
}

#[test]
fn an_unreachable_coordinator_is_a_one_line_error_within_the_timeout() {
    // Nothing listens: connections are refused.
    let refused = Endpoints::parse(&format!("etcd://127.0.0.1:{}", free_port())).unwrap();
    assert_unreachable(&refused, "refused");
    // Something accepts connections but never answers (a hung or partitioned etcd).
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = silent.local_addr().unwrap();
    let silent_endpoints = Endpoints::parse(&format!("etcd://{addr}")).unwrap();
    assert_unreachable(&silent_endpoints, "silent");
    drop(silent);
}

#[test]
fn one_dead_endpoint_among_several_is_tolerated() {
    let etcd = Etcd::start();
    let dead = free_port();
    let both = Endpoints::parse(&format!(
        "etcd://127.0.0.1:{dead},{}",
        etcd.endpoints.hosts()[0]
    ))
    .unwrap();
    let c = EtcdCoordinator::connect(&both, Duration::from_secs(2)).unwrap();
    for _ in 0..5 {
        c.current("vm").unwrap();
    }
    assert!(c.claim("vm", None, "host-a").unwrap().won());
}

#[test]
fn a_malformed_value_is_a_clear_error() {
    let etcd = Etcd::start();
    let c = etcd.coordinator();
    let key = owner_key("vm");
    for garbage in [&b"not json"[..], b"{\"owner\":\"a\"}", b"\xff\x00\x01", b""] {
        etcd.put_raw(&key, garbage);
        let results = [
            c.current("vm").map(drop),
            c.claim("vm", None, "host-a").map(drop),
            c.claim("vm", Some(&own("host-a", 1)), "host-a").map(drop),
            c.still_owner("vm", &own("host-a", 1)).map(drop),
        ];
        for r in results {
            let err = r.expect_err("a malformed value was accepted");
            let text = err.to_string();
            assert!(matches!(err, CoordinatorError::Malformed { .. }), "{text}");
            assert!(!text.contains('\n'), "not one line: {text}");
            assert!(text.contains(&key), "{text}");
        }
    }
}

#[test]
fn an_ownership_written_by_hand_can_be_claimed_from() {
    let etcd = Etcd::start();
    let c = etcd.coordinator();
    // The same ownership with other bytes than ours (spaces, other field order).
    etcd.put_raw(&owner_key("vm"), br#"{ "term": 4, "owner": "host-a" }"#);
    assert_eq!(c.current("vm").unwrap().unwrap().0, own("host-a", 4));
    assert!(c.still_owner("vm", &own("host-a", 4)).unwrap());
    assert_eq!(
        c.claim("vm", Some(&own("host-a", 3)), "host-b").unwrap(),
        Claim::Lost(own("host-a", 4))
    );
    assert_eq!(
        c.claim("vm", Some(&own("host-a", 4)), "host-b").unwrap(),
        Claim::Won(own("host-b", 5))
    );
}

#[test]
fn bad_vm_ids_are_refused_before_asking() {
    let etcd = Etcd::start();
    let c = etcd.coordinator();
    for bad in ["", "a/b", "a b"] {
        let err = c.claim(bad, None, "host-a").unwrap_err();
        assert!(matches!(err, CoordinatorError::BadVmId { .. }), "{err}");
    }
}

/// Claim latency: 200 successive claims (each a promotion T → T+1), p50 and p99. Failover's
/// detection and resume targets are 50 ms each, so this must stay well under that.
#[test]
fn claim_latency() {
    const CLAIMS: usize = 200;
    let etcd = Etcd::start();
    // The first call of a new client connects (TCP and HTTP/2): timed apart.
    let start = Instant::now();
    let c = etcd.coordinator();
    assert_eq!(c.current("vm").unwrap(), None);
    let cold = start.elapsed().as_secs_f64() * 1e3;
    let mut current: Option<Ownership> = None;
    let mut claims = Vec::with_capacity(CLAIMS);
    let mut reads = Vec::with_capacity(CLAIMS);
    for i in 0..CLAIMS {
        let start = Instant::now();
        let claim = c
            .claim("vm", current.as_ref(), &format!("host-{}", i % 2))
            .unwrap();
        claims.push(start.elapsed());
        assert!(claim.won());
        current = Some(claim.ownership().clone());
        let start = Instant::now();
        assert!(c.still_owner("vm", claim.ownership()).unwrap());
        reads.push(start.elapsed());
    }
    let pct = |v: &mut Vec<Duration>, p: usize| {
        v.sort();
        v[(v.len() * p / 100).min(v.len() - 1)].as_secs_f64() * 1e3
    };
    let (claim_p50, claim_p99) = (pct(&mut claims, 50), pct(&mut claims, 99));
    let claim_max = pct(&mut claims, 100);
    let (read_p50, read_p99) = (pct(&mut reads, 50), pct(&mut reads, 99));
    println!(
        "coordinator: claims={CLAIMS} claim_p50_ms={claim_p50:.2} claim_p99_ms={claim_p99:.2} \
         claim_max_ms={claim_max:.2} still_owner_p50_ms={read_p50:.2} \
         still_owner_p99_ms={read_p99:.2} first_call_ms={cold:.2}"
    );
    assert!(claim_p50 < 1000.0, "a claim takes {claim_p50} ms at p50");
}

#[test]
fn calling_from_inside_an_async_runtime_is_refused_not_a_panic() {
    let endpoints = Endpoints::parse(&format!("etcd://127.0.0.1:{}", free_port())).unwrap();
    let outside = EtcdCoordinator::connect(&endpoints, Duration::from_millis(100)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let err = EtcdCoordinator::connect(&endpoints, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, CoordinatorError::InsideAsync), "{err}");
        let err = outside.current("vm").unwrap_err();
        assert!(matches!(err, CoordinatorError::InsideAsync), "{err}");
        // Dropping it here must not panic either.
        drop(outside);
    });
}

#[test]
fn standbys_register_under_their_vm_and_are_listed_by_host() {
    let etcd = Etcd::start();
    let c = etcd.coordinator();
    let member = |host: &str, epoch: u64| Member {
        host: host.into(),
        addr: format!("{host}:7171"),
        committed_epoch: epoch,
        term: 1,
    };
    assert_eq!(c.members("vm-m").unwrap(), []);
    c.register("vm-m", &member("b", 0)).unwrap();
    c.register("vm-m", &member("a", 7)).unwrap();
    c.register("vm-other", &member("c", 1)).unwrap();
    // An update replaces the registration.
    c.register("vm-m", &member("b", 9)).unwrap();
    assert_eq!(c.members("vm-m").unwrap(), [member("a", 7), member("b", 9)]);
    // Garbage under the prefix (an operator's etcdctl) is left out, not an error.
    etcd.put_raw(&member_key("vm-m", "junk"), b"not json");
    assert_eq!(c.members("vm-m").unwrap().len(), 2);
    assert!(c.register("vm-m", &member("bad/host", 0)).is_err());
    // The same semantics in memory.
    let m = MemoryCoordinator::new();
    m.register("vm-m", &member("b", 0)).unwrap();
    m.register("vm-m", &member("a", 7)).unwrap();
    m.register("vm-m2", &member("z", 7)).unwrap();
    assert_eq!(m.members("vm-m").unwrap(), [member("a", 7), member("b", 0)]);
}
