//! Failover's authority and takeover on this host's `/dev/kvm`, with the epoch writer guest
//! (vmm's `tests/guests/epoch_writer.S`) replicated to a standby over a Unix socket:
//!
//! - a primary that loses its standby wins the compare-and-swap (term 2) and goes on
//!   unprotected, its guest running;
//! - a primary that loses one of two standbys claims term 2 before it releases on the other's
//!   acks, and its next epochs carry term 2;
//! - a standby that took over first (term 2) makes the primary's claim lose: the primary is
//!   fenced, its vCPUs paused, its held output discarded and nothing more released; a primary
//!   that cannot reach the coordinator is fenced too;
//! - a takeover is refused when the VM is owned with a later term than the standby committed;
//! - the taken-over VM runs on from the committed epoch with the logged inbound frames in its
//!   network device's receive queue, in order;
//! - with a real etcd, 20 races between a primary's drop of its standby and the standby's
//!   takeover: never both winners.
//!
//! The coordinator is a [`MemoryCoordinator`] but in the race. Network devices sit on TAPs in
//! a private network namespace of the test's thread; the tiny guest has no network driver, so
//! the guest's output is fed to the egress gate by the test, and the inbound frames a primary
//! mirrors are given to the standby's staging as its link would deliver them.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use replicator::conn::Conn;
use replicator::coordinator::{
    Claim, Coordinator, CoordinatorError, Member, MemoryCoordinator, Ownership, Revision,
};
use replicator::primary::vm::VmThread;
use replicator::primary::{pair_standby, Authority, Engine, EngineOptions, NewStandby};
use replicator::standby::host::{Standby, StandbyError};
use replicator::standby::staging::{Received, StagingOptions};
use replicator::standby::takeover::{takeover, TakeoverError};
use replicator::wire::Message;
use virtio_net_tap::testutil::{ether_frame, with_header, NetNs};
use virtio_net_tap::Admission;
use vmm::builder::RestoreOptions;
use vmm::config::NetConfig;
use vmm::devices::virtio::VirtioDeviceState;
use vmm::microvm::{MicroVm, VmPhase};
use vmm::snapshot::MicroVmState;
use vmm::vstate::vcpu::ExitReason;

#[path = "support/etcd.rs"]
mod etcd;
use etcd::Etcd;
#[path = "support/guest.rs"]
mod guest;
use guest::{hello, key, profile, progress, progress_in, restore_options, writer_with};

/// The epoch writer guest in a 64 MiB VM writing records into `pages` pages, with a network
/// device on TAP `tap` if given (the guest never drives it).
fn writer(pages: u64, tap: Option<&str>) -> VmThread {
    writer_with("failover", pages, |config| {
        config.net = tap
            .map(|t| {
                vec![NetConfig {
                    tap: t.into(),
                    mac: Some("06:00:0a:00:02:02".into()),
                }]
            })
            .unwrap_or_default();
    })
}

/// Runs `microvm` (its vCPUs started here) until the epoch writer wrote 1000 records more than
/// it had, for at most 10 s, then pauses and saves it; the progress made and the saved state.
fn run_on(microvm: &mut MicroVm) -> (u64, MicroVmState) {
    let from = progress_in(microvm.vm().memory());
    let t0 = Instant::now();
    let mut saved = None;
    let end = microvm
        .run_with(|m| {
            let done = progress_in(m.vm().memory()) > from + 1000;
            if saved.is_none() && (done || t0.elapsed() >= Duration::from_secs(10)) {
                m.pause().unwrap();
                saved = Some(m.save_state().unwrap());
                m.run_state().request_exit(ExitReason::Stopped);
            }
        })
        .unwrap();
    assert_eq!(end, ExitReason::Stopped);
    let ran = progress_in(microvm.vm().memory()) - from;
    (ran, saved.unwrap())
}

fn own(owner: &str, term: u64) -> Ownership {
    Ownership {
        owner: owner.into(),
        term,
    }
}

fn new_standby(k: u8) -> Arc<Standby<Vec<u8>>> {
    Arc::new(Standby::new(profile(), key(k), Vec::new(), StagingOptions::default()).unwrap())
}

type Server = JoinHandle<Result<String, StandbyError>>;

/// `standby` serving a primary over a Unix socket pair on a thread: the primary's end paired,
/// a handle on the standby's end (to cut the link), and the serving thread (why it stopped).
fn serve(standby: &Arc<Standby<Vec<u8>>>, k: u8) -> (NewStandby, Conn, Server) {
    let (a, b) = UnixStream::pair().unwrap();
    let theirs = Conn::Unix(b);
    let cut = theirs.try_clone().unwrap();
    let serving = standby.clone();
    let server = std::thread::spawn(move || serving.serve(theirs).map(|(_, end)| end.to_string()));
    let (conn, link, ack) = pair_standby(
        "standby",
        Conn::Unix(a),
        &key(k),
        &hello(),
        Duration::from_secs(2),
    )
    .unwrap();
    let peer = NewStandby {
        name: "standby".into(),
        conn,
        link,
        ack,
    };
    (peer, cut, server)
}

/// The primary's authority over `vm`, created in `coordinator` (term 1).
fn first_owner(coordinator: Arc<dyn Coordinator>, vm: &str, me: &str) -> Authority {
    let ownership = match coordinator.claim(vm, None, me).unwrap() {
        Claim::Won(o) => o,
        Claim::Lost(o) => panic!("{vm} is owned already: {o}"),
    };
    assert_eq!(ownership.term, 1);
    Authority {
        coordinator,
        vm: vm.into(),
        me: me.into(),
        ownership,
    }
}

/// Steps `engine` until epoch `n` is shipped and committed, and the initial synchronisation
/// converged (the standbys may take the VM over).
fn commit_through(engine: &mut Engine, n: u64) {
    let t0 = Instant::now();
    while engine.next_epoch() <= n || engine.synced_through().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the initial synchronisation did not converge"
        );
        engine.step().unwrap();
    }
    // The epoch after the one `Protected` followed: the standby has read it.
    let n = n.max(engine.synced_through().unwrap() + 1);
    while engine.next_epoch() <= n {
        engine.step().unwrap();
    }
    assert!(
        engine.wait_committed(n, Duration::from_secs(5)),
        "epoch {n} not acknowledged"
    );
}

/// Steps `engine` until it stops protecting the VM (what it decides on losing its standby).
fn step_until_unprotected(engine: &mut Engine) {
    let t0 = Instant::now();
    while engine.is_protected() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the lost standby was not dropped"
        );
        engine.step().unwrap();
    }
}

#[test]
fn a_primary_that_loses_its_standby_wins_the_claim_and_goes_on_unprotected() {
    let coordinator = Arc::new(MemoryCoordinator::new());
    let vm = writer(256, None);
    let standby = new_standby(1);
    let (peer, cut, server) = serve(&standby, 1);
    let options = EngineOptions {
        authority: Some(first_owner(coordinator.clone(), "vm-a", "primary")),
        // Not the authority's: the authority's term wins.
        term: 7,
        ..Default::default()
    };
    let mut engine = Engine::start(&vm, vec![peer], options).unwrap();
    assert_eq!(engine.term(), 1);
    commit_through(&mut engine, 5);
    assert_eq!(standby.info().committed_term, 1);

    // The standby's link is cut: the primary claims term 2 and wins.
    cut.shutdown();
    step_until_unprotected(&mut engine);
    let m = engine.metrics().lock().unwrap().clone();
    assert!(m.fenced.is_none(), "{:?}", m.fenced);
    assert!(!m.protected);
    assert_eq!(m.standbys, 0);
    assert_eq!(m.term, 2);
    assert_eq!(engine.term(), 2);
    assert_eq!(
        coordinator.current("vm-a").unwrap().unwrap().0,
        own("primary", 2)
    );
    let before = progress(&vm);
    std::thread::sleep(Duration::from_millis(50));
    assert!(progress(&vm) > before, "the guest stopped");
    assert_eq!(vm.run(|m| m.phase()).unwrap(), VmPhase::Running);
    // Already unprotected: ending the engine claims nothing more.
    engine.shutdown();
    assert_eq!(
        coordinator.current("vm-a").unwrap().unwrap().0,
        own("primary", 2)
    );
    server.join().unwrap().unwrap();
    assert!(standby.info().committed_epoch >= 5);
    vm.stop().unwrap();
}

#[test]
fn losing_one_of_two_standbys_needs_the_claim_and_the_next_epochs_carry_the_new_term() {
    let coordinator = Arc::new(MemoryCoordinator::new());
    let vm = writer(256, None);
    let (a, b) = (new_standby(6), new_standby(6));
    let (peer_a, cut_a, server_a) = serve(&a, 6);
    let (peer_b, _cut_b, server_b) = serve(&b, 6);
    let options = EngineOptions {
        authority: Some(first_owner(coordinator.clone(), "vm-e", "primary")),
        ..Default::default()
    };
    let mut engine = Engine::start(&vm, vec![peer_a, peer_b], options).unwrap();
    commit_through(&mut engine, 5);
    // a is lost: it may be one that was promoted, so b's acks alone release output only once
    // the primary won term 2.
    cut_a.shutdown();
    let t0 = Instant::now();
    while engine.metrics().lock().unwrap().standbys == 2 {
        assert!(t0.elapsed() < Duration::from_secs(5), "a was not dropped");
        engine.step().unwrap();
    }
    assert!(engine.is_protected());
    assert_eq!(engine.term(), 2);
    assert_eq!(
        coordinator.current("vm-e").unwrap().unwrap().0,
        own("primary", 2)
    );
    let next = engine.next_epoch();
    commit_through(&mut engine, next + 2);
    assert_eq!(b.info().committed_term, 2);
    assert_eq!(a.info().committed_term, 1);
    engine.shutdown();
    // Ending protection releases what b did not acknowledge: one more claim.
    assert_eq!(
        coordinator.current("vm-e").unwrap().unwrap().0,
        own("primary", 3)
    );
    server_a.join().unwrap().unwrap();
    server_b.join().unwrap().unwrap();
    vm.stop().unwrap();
}

/// A coordinator that never answers a claim (a primary partitioned from etcd).
struct Unreachable;

impl Coordinator for Unreachable {
    fn current(&self, _vm: &str) -> Result<Option<(Ownership, Revision)>, CoordinatorError> {
        Err(self.error())
    }

    fn claim(
        &self,
        _vm: &str,
        _expected: Option<&Ownership>,
        _me: &str,
    ) -> Result<Claim, CoordinatorError> {
        Err(self.error())
    }

    fn register(&self, _vm: &str, _member: &Member) -> Result<(), CoordinatorError> {
        Err(self.error())
    }

    fn members(&self, _vm: &str) -> Result<Vec<Member>, CoordinatorError> {
        Err(self.error())
    }
}

impl Unreachable {
    fn error(&self) -> CoordinatorError {
        CoordinatorError::Unreachable {
            endpoints: "etcd://192.0.2.1:2379".into(),
            op: "claim /vmr/vms/vm-f/owner".into(),
            timeout: Duration::from_secs(2),
            detail: None,
        }
    }
}

#[test]
fn a_primary_that_cannot_reach_the_coordinator_is_fenced() {
    let vm = writer(256, None);
    let standby = new_standby(7);
    let (peer, cut, server) = serve(&standby, 7);
    let options = EngineOptions {
        authority: Some(Authority {
            coordinator: Arc::new(Unreachable),
            vm: "vm-f".into(),
            me: "primary".into(),
            ownership: own("primary", 1),
        }),
        ..Default::default()
    };
    let mut engine = Engine::start(&vm, vec![peer], options).unwrap();
    commit_through(&mut engine, 3);
    cut.shutdown();
    step_until_unprotected(&mut engine);
    let fenced = engine.fenced().expect("the primary was not fenced");
    assert_eq!(fenced.owner, None);
    assert!(fenced.reason.contains("unreachable"), "{}", fenced.reason);
    assert_eq!(engine.term(), 1);
    assert_eq!(vm.run(|m| m.phase()).unwrap(), VmPhase::Paused);
    engine.shutdown();
    server.join().unwrap().unwrap();
    vm.stop().unwrap();
}

#[test]
fn a_primary_whose_standby_took_over_is_fenced_and_releases_nothing_more() {
    let Some(ns) = NetNs::enter() else { return };
    let coordinator = Arc::new(MemoryCoordinator::new());
    let vm = writer(256, Some(&ns.tap_name("fpri")));
    let standby = new_standby(2);
    let (peer, _cut, server) = serve(&standby, 2);
    let options = EngineOptions {
        authority: Some(first_owner(coordinator.clone(), "vm-b", "primary")),
        ..Default::default()
    };
    let mut engine = Engine::start(&vm, vec![peer], options).unwrap();
    commit_through(&mut engine, 5);

    // Output of the open epoch (the test stands in for the guest's driver): held until the
    // standby acknowledges the epoch.
    let egress = engine.ports().net[0].egress().clone();
    let before = egress.stats();
    for i in 0..3u8 {
        let frame = with_header(&ether_frame([0xff; 6], &[i; 60]));
        assert_eq!(egress.send(&frame), Admission::Held);
    }
    assert_eq!(egress.held_frames(), 3);

    // The standby takes over first: term 2, owner the standby.
    let options = RestoreOptions {
        net: vec![NetConfig {
            tap: ns.tap_name("fsby"),
            mac: None,
        }],
        ..restore_options()
    };
    let taken = takeover(
        &*standby,
        Some((&*coordinator, "vm-b", "standby")),
        &options,
    )
    .unwrap();
    assert_eq!(taken.term, 2);
    assert!(taken.epoch >= 5);
    assert_eq!(
        coordinator.current("vm-b").unwrap().unwrap().0,
        own("standby", 2)
    );

    // Then the primary loses its standby (it refuses the next epoch): the claim is lost.
    step_until_unprotected(&mut engine);
    let m = engine.metrics().lock().unwrap().clone();
    let fenced = engine.fenced().expect("the primary was not fenced");
    assert_eq!(m.fenced.as_ref(), Some(&fenced));
    assert_eq!(fenced.owner, Some(own("standby", 2)));
    assert!(
        fenced.reason.contains("standby (term 2)"),
        "{}",
        fenced.reason
    );
    assert_eq!(fenced.discarded_frames, 3);
    assert_eq!(engine.term(), 1);
    assert!(!m.protected);
    assert_eq!((m.held_frames, m.held_bytes), (0, 0));
    // Its held output was discarded, never released.
    let after = egress.stats();
    assert_eq!(after.released_frames, before.released_frames);
    assert_eq!(after.discarded_frames, before.discarded_frames + 3);
    assert_eq!(egress.held_frames(), 0);
    // Its vCPUs are paused.
    assert_eq!(vm.run(|m| m.phase()).unwrap(), VmPhase::Paused);
    let p = progress(&vm);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(progress(&vm), p, "the fenced guest runs");
    // The engine is stopped, and ending it releases nothing and claims nothing.
    assert_eq!(engine.step().unwrap(), None);
    engine.shutdown();
    assert_eq!(egress.stats().released_frames, before.released_frames);
    assert_eq!(
        coordinator.current("vm-b").unwrap().unwrap().0,
        own("standby", 2)
    );
    let end = server.join().unwrap().unwrap();
    assert!(end.contains("promoted"), "{end}");

    // The VM runs at the standby.
    let mut promoted = taken.vm;
    let (ran, _) = run_on(&mut promoted);
    assert!(
        ran > 1000,
        "the taken-over guest did not run on: {ran} records"
    );
    vm.stop().unwrap();
}

#[test]
fn a_takeover_is_refused_when_the_vm_is_owned_with_a_later_term() {
    let coordinator = Arc::new(MemoryCoordinator::new());
    let vm = writer(64, None);
    let standby = new_standby(3);
    let (peer, _cut, server) = serve(&standby, 3);
    let authority = first_owner(coordinator.clone(), "vm-c", "primary");
    // The engine sends term 1; without its authority it claims nothing when it ends.
    let mut engine = Engine::start(&vm, vec![peer], EngineOptions::default()).unwrap();
    commit_through(&mut engine, 3);
    engine.shutdown();
    vm.stop().unwrap();
    server.join().unwrap().unwrap();
    assert_eq!(standby.info().committed_term, 1);

    // The primary went on without this standby: it holds term 2.
    let claim = coordinator
        .claim("vm-c", Some(&authority.ownership), "primary")
        .unwrap();
    assert_eq!(claim, Claim::Won(own("primary", 2)));
    let err = takeover(
        &*standby,
        Some((&*coordinator, "vm-c", "standby")),
        &restore_options(),
    )
    .err()
    .expect("taken over from an older term");
    assert!(
        matches!(
            &err,
            TakeoverError::NotOwner { owner, term: 2, committed_term: 1 } if owner == "primary"
        ),
        "{err}"
    );
    assert!(!standby.info().promoted);
    assert_eq!(
        coordinator.current("vm-c").unwrap().unwrap().0,
        own("primary", 2)
    );
    // Nobody owns an unknown VM: nothing to take over from.
    let err = takeover(
        &*standby,
        Some((&*coordinator, "vm-unknown", "standby")),
        &restore_options(),
    )
    .err()
    .expect("taken over an unowned VM");
    assert!(matches!(err, TakeoverError::NoOwnership { .. }), "{err}");
    assert!(!standby.info().promoted);

    // Forced, without a coordinator: no claim, the committed term.
    let taken = takeover(&*standby, None, &restore_options()).unwrap();
    assert_eq!(taken.term, 1);
    assert!(standby.info().promoted);
    assert_eq!(
        coordinator.current("vm-c").unwrap().unwrap().0,
        own("primary", 2)
    );
}

#[test]
fn the_taken_over_vm_runs_on_from_the_committed_epoch_with_the_logged_inbound_frames() {
    let Some(ns) = NetNs::enter() else { return };
    let coordinator = Arc::new(MemoryCoordinator::new());
    first_owner(coordinator.clone(), "vm-d", "primary");
    let vm = writer(1024, Some(&ns.tap_name("ftko")));
    let standby = new_standby(4);
    let (peer, _cut, server) = serve(&standby, 4);
    let mut engine = Engine::start(&vm, vec![peer], EngineOptions::default()).unwrap();
    commit_through(&mut engine, 10);
    // The primary is gone.
    engine.shutdown();
    vm.stop().unwrap();
    server.join().unwrap().unwrap();
    let epoch = standby.info().committed_epoch;
    let at_commit = progress_in(standby.committed().memory().guest_memory());

    // The inbound frames the primary delivered to its guest in the epochs after the committed
    // one, as its link hands them to the standby's staging.
    let frames: Vec<Vec<u8>> = (0..5u8)
        .map(|i| with_header(&ether_frame([0x06, 0, 0x0a, 0, 2, 2], &[i; 64])))
        .collect();
    {
        let mut s = standby.committed();
        let old = Message::Inbound {
            epoch,
            net: 0,
            frame: vec![0xee; 80],
        };
        assert_eq!(s.receive(old).unwrap(), Received::InboundDropped);
        for (i, frame) in frames.iter().enumerate() {
            let msg = Message::Inbound {
                epoch: epoch + 1 + i as u64 / 3,
                net: 0,
                frame: frame.clone(),
            };
            assert_eq!(s.receive(msg).unwrap(), Received::InboundLogged);
        }
        // A device the VM lacks: not re-injected, and no harm done.
        let stray = Message::Inbound {
            epoch: epoch + 1,
            net: 1,
            frame: vec![0xdd; 80],
        };
        assert_eq!(s.receive(stray).unwrap(), Received::InboundLogged);
    }
    assert_eq!(standby.info().inbound_frames, 6);

    // The standby host's own TAP.
    let options = RestoreOptions {
        net: vec![NetConfig {
            tap: ns.tap_name("ftks"),
            mac: None,
        }],
        ..restore_options()
    };
    let taken = takeover(
        &*standby,
        Some((&*coordinator, "vm-d", "standby")),
        &options,
    )
    .unwrap();
    assert_eq!(
        (
            taken.term,
            taken.epoch,
            taken.reinjected,
            taken.not_reinjected
        ),
        (2, epoch, 5, 1)
    );
    assert_eq!(
        coordinator.current("vm-d").unwrap().unwrap().0,
        own("standby", 2)
    );
    let mut promoted = taken.vm;
    assert_eq!(progress_in(promoted.vm().memory()), at_commit);
    // Runs, then is paused and saved: the frames wait in the receive queue's backlog, in order
    // (the guest has no driver to take them).
    let (ran, state) = run_on(&mut promoted);
    assert!(
        ran > 1000,
        "the taken-over guest did not run on from {at_commit}: {ran} records"
    );
    let backlog = state
        .devices
        .virtio
        .iter()
        .find_map(|m| match &m.device {
            VirtioDeviceState::Net(n) => Some(n.rx_backlog.clone()),
            VirtioDeviceState::Block(_) => None,
        })
        .expect("a network device");
    assert_eq!(backlog, frames);
}

#[test]
fn with_etcd_a_primary_and_a_standby_racing_for_the_vm_never_both_win() {
    const ROUNDS: usize = 20;
    let etcd = Etcd::start();
    let (mut primary_won, mut standby_won) = (0, 0);
    for round in 0..ROUNDS {
        let id = format!("race-{round}");
        let authority = first_owner(Arc::new(etcd.coordinator()), &id, "primary");
        let vm = writer(64, None);
        let standby = new_standby(5);
        let (peer, cut, server) = serve(&standby, 5);
        let options = EngineOptions {
            authority: Some(authority),
            ..Default::default()
        };
        let mut engine = Engine::start(&vm, vec![peer], options).unwrap();
        commit_through(&mut engine, 2);

        // The standby takes over while the primary loses it.
        let barrier = Arc::new(Barrier::new(2));
        let racer = {
            let (barrier, standby, id) = (barrier.clone(), standby.clone(), id.clone());
            let coordinator = etcd.coordinator();
            std::thread::spawn(move || {
                barrier.wait();
                takeover(
                    &*standby,
                    Some((&coordinator, &id, "standby")),
                    &restore_options(),
                )
                .map(|t| t.term)
            })
        };
        barrier.wait();
        cut.shutdown();
        step_until_unprotected(&mut engine);
        let taken = racer.join().unwrap();
        let current = etcd.coordinator().current(&id).unwrap().unwrap().0;
        match (taken, engine.fenced()) {
            (Ok(term), Some(fenced)) => {
                assert_eq!(term, 2);
                assert_eq!(fenced.owner, Some(own("standby", 2)));
                assert_eq!(current, own("standby", 2));
                assert_eq!(vm.run(|m| m.phase()).unwrap(), VmPhase::Paused);
                standby_won += 1;
            }
            (Err(TakeoverError::NotOwner { owner, term, .. }), None) => {
                assert_eq!((owner.as_str(), term), ("primary", 2));
                assert_eq!(engine.term(), 2);
                assert_eq!(current, own("primary", 2));
                assert!(!standby.info().promoted);
                primary_won += 1;
            }
            (taken, fenced) => {
                panic!("round {round}: takeover {taken:?}, primary fenced {fenced:?}")
            }
        }
        engine.shutdown();
        server.join().unwrap().unwrap();
        vm.stop().unwrap();
    }
    eprintln!("{ROUNDS} races: the primary won {primary_won}, the standby {standby_won}");
    assert_eq!(primary_won + standby_won, ROUNDS);
}
