//! natd's request handling: turns API requests into controller changes and reports. No I/O of
//! its own besides the maps, so the API server stays a thin layer.
use log::warn;
use nat_common::Reason;

use crate::{
    api::{MappingStatus, ReasonStat, Reply, Request, Response, StatsReport},
    ebpf::{Dataplane, MappingCounters},
    netfilter::Nft,
    reconcile::Controller,
    state::Mapping,
};

pub type NatController = Controller<Dataplane, Nft>;

/// Answers one request. Every refusal is an `Error` response naming what was wrong.
pub fn handle(ctl: &mut NatController, req: Request) -> Response {
    match req {
        Request::MappingAdd { public, private } => {
            match ctl.add_mapping(Mapping { public, private }) {
                Ok(_) => done(format!("mapping added: {public} -> {private}")),
                Err(e) => refuse(format!("mapping add {public} {private} refused: {e}")),
            }
        }
        Request::MappingDel { public } => match ctl.remove_mapping(public) {
            Ok(d) => {
                let private = d
                    .removed
                    .first()
                    .map(|m| m.private.to_string())
                    .unwrap_or_default();
                done(format!("mapping removed: {public} -> {private}"))
            }
            Err(e) => refuse(format!("mapping del {public} refused: {e}")),
        },
        Request::MappingList => match mappings(ctl) {
            Ok(mappings) => Response::Ok(Reply::Mappings { mappings }),
            Err(e) => refuse(e),
        },
        Request::Stats => match stats(ctl) {
            Ok(s) => Response::Ok(Reply::Stats(s)),
            Err(e) => refuse(e),
        },
    }
}

fn done(message: String) -> Response {
    Response::Ok(Reply::Done { message })
}

fn refuse(message: String) -> Response {
    warn!("{message}");
    Response::Error { message }
}

fn mappings(ctl: &mut NatController) -> Result<Vec<MappingStatus>, String> {
    let list: Vec<Mapping> = ctl.state().mappings().collect();
    list.into_iter()
        .map(|m| {
            let counters: MappingCounters = ctl
                .fast_mut()
                .counters(m)
                .map_err(|e| format!("reading counters: {e}"))?;
            Ok(MappingStatus {
                public: m.public,
                private: m.private,
                counters,
            })
        })
        .collect()
}

fn stats(ctl: &mut NatController) -> Result<StatsReport, String> {
    let mappings = mappings(ctl)?;
    let counters = ctl
        .fast_mut()
        .stats()
        .map_err(|e| format!("reading counters: {e}"))?;
    let reasons = Reason::ALL
        .iter()
        .map(|r| {
            let c = counters.get(r).copied().unwrap_or_default();
            ReasonStat {
                reason: r.name().to_string(),
                action: r.action().to_string(),
                packets: c.packets,
                bytes: c.bytes,
            }
        })
        .collect();
    Ok(StatsReport {
        generation: ctl.generation(),
        interfaces: ctl.fast_mut().attached().cloned().collect(),
        reasons,
        mappings,
    })
}
