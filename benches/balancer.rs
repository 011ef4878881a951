//! Micro-benchmarks of the strategies: one pick over 3, 100 and 1,000 backends, and the
//! Maglev table build. Run with `cargo bench`; compare commits within one run.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use ballast::balancer::{self, ip_hash::Maglev, Candidate};
use ballast::config::Strategy;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn backends(n: usize) -> (Vec<String>, Vec<Candidate>) {
    let names = (0..n).map(|i| format!("app{i}")).collect();
    let cands = (0..n)
        .map(|i| Candidate::new(i % 7 != 3, 1 + (i % 3) as u32, (i * 13 % 50) as u64))
        .collect();
    (names, cands)
}

fn picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for n in [3usize, 100, 1000] {
        let (names, cands) = backends(n);
        let list: Vec<(&str, u32)> = names.iter().map(|s| (s.as_str(), 1)).collect();
        for strategy in [
            Strategy::RoundRobin,
            Strategy::Weighted,
            Strategy::LeastConn,
            Strategy::IpHash,
        ] {
            let b = balancer::build(strategy, &list);
            let mut client = 0u32;
            group.bench_with_input(BenchmarkId::new(strategy.to_string(), n), &n, |bench, _| {
                bench.iter(|| {
                    client = client.wrapping_add(0x9e37_79b9);
                    black_box(b.pick(black_box(&cands), IpAddr::V4(Ipv4Addr::from(client))))
                })
            });
        }
    }
    group.finish();
}

fn maglev_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build");
    group.sample_size(10);
    for n in [3usize, 100, 1000] {
        let (names, _) = backends(n);
        let list: Vec<(&str, u32)> = names.iter().map(|s| (s.as_str(), 1)).collect();
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |bench, _| {
            bench.iter(|| black_box(Maglev::new(black_box(&list))))
        });
    }
    group.finish();
}

criterion_group!(benches, picks, maglev_build);
criterion_main!(benches);
