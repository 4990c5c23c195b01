//! `sluice-load`: the load generator, sink and test DNS for sluice (see issue "sluice-load").
//! Not yet implemented: this binary only says so, and exits non-zero so that no script mistakes
//! it for a working instrument.

fn main() {
    eprintln!("sluice-load: not yet implemented (send, sink, dns and bench are planned)");
    std::process::exit(2);
}
