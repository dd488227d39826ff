//! XDP attachments (pinned links adopted or created), the tc egress learner and ingress
//! marker, re-attachment after an interface was deleted and created again, detaching.
use super::*;

impl Dataplane {
    /// Declares `name` with `role` (redirect target first, then role) and attaches the program.
    pub fn attach(
        &mut self,
        name: &str,
        role: Role,
        mode: Mode,
    ) -> Result<Attached, DataplaneError> {
        let ifindex = ifindex(name)?;
        DevMapHash::try_from(self.map(MAP_DEVMAP)?)
            .map_err(map_err(MAP_DEVMAP))?
            .insert(ifindex, ifindex, None, 0)
            .map_err(|source| DataplaneError::DevMap {
                map: MAP_DEVMAP,
                source,
            })?;
        HashMap::<_, u32, IfaceConfig>::try_from(self.map(MAP_IFACES)?)
            .map_err(map_err(MAP_IFACES))?
            .insert(
                ifindex,
                IfaceConfig {
                    role: role_raw(role),
                    addr: iface_ipv4(name).map_or(0, |a| u32::from_ne_bytes(a.octets())),
                },
                0,
            )
            .map_err(map_err(MAP_IFACES))?;
        let pin = self.pins.as_ref().map(|p| p.link(name));
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or(DataplaneError::MissingProgram)?
            .try_into()
            .map_err(DataplaneError::Program)?;
        // An earlier natd's link: swap our program in atomically (bpf_link_update), so the
        // interface never runs without one.
        if let Some(path) = pin.as_ref().filter(|p| p.exists()) {
            let link = PinnedLink::from_pin(path).map_err(DataplaneError::Link)?;
            let link = XdpLink::try_from(FdLink::from(link)).map_err(DataplaneError::Link)?;
            let id = prog
                .attach_to_link(link)
                .map_err(|source| DataplaneError::Replace {
                    iface: name.to_string(),
                    source,
                })?;
            let fd = FdLink::try_from(prog.take_link(id).map_err(DataplaneError::Program)?)
                .map_err(DataplaneError::Link)?;
            let a = Attached {
                name: name.to_string(),
                ifindex,
                role,
                mode,
                adopted: true,
                reattached: 0,
            };
            self.attached
                .push((a.clone(), Held::Pinned(fd, path.clone())));
            return Ok(a);
        }
        let link = match mode {
            Mode::Native => {
                prog.attach_to_if_index(ifindex, XdpMode::Driver)
                    .map_err(|source| DataplaneError::AttachNative {
                        iface: name.to_string(),
                        source,
                    })?
            }
            Mode::Generic => prog
                .attach_to_if_index(ifindex, XdpMode::Skb)
                .map_err(|source| DataplaneError::AttachGeneric {
                    iface: name.to_string(),
                    source,
                })?,
        };
        let held = match pin {
            Some(path) => {
                let fd = FdLink::try_from(prog.take_link(link).map_err(DataplaneError::Program)?)
                    .map_err(DataplaneError::Link)?;
                let pinned = fd.pin(&path).map_err(|source| DataplaneError::Pin {
                    path: path.clone(),
                    source,
                })?;
                Held::Pinned(FdLink::from(pinned), path)
            }
            None => Held::Owned(link),
        };
        let a = Attached {
            name: name.to_string(),
            ifindex,
            role,
            mode,
            adopted: false,
            reattached: 0,
        };
        self.attached.push((a.clone(), held));
        Ok(a)
    }

    pub fn attached(&self) -> impl Iterator<Item = &Attached> {
        self.attached.iter().map(|(a, _)| a)
    }

    /// Interfaces whose name now has another ifindex or none: deleted (and perhaps created
    /// again) since natd attached to them.
    pub fn stale(&self) -> Vec<(Attached, Option<u32>)> {
        self.attached
            .iter()
            .map(|(a, _)| (a.clone(), ifindex(&a.name).ok()))
            .filter(|(a, now)| *now != Some(a.ifindex))
            .collect()
    }

    /// Writes the current first IPv4 address of attached interface `ifindex` to its entry in
    /// the interface map (an address added or removed since natd attached). Returns the
    /// interface's name and new address if the entry changed.
    pub fn refresh_address(
        &mut self,
        ifindex: u32,
    ) -> Result<Option<(String, Option<std::net::Ipv4Addr>)>, DataplaneError> {
        let Some((a, _)) = self.attached.iter().find(|(a, _)| a.ifindex == ifindex) else {
            return Ok(None);
        };
        let (name, role) = (a.name.clone(), a.role);
        let now = iface_ipv4(&name);
        let addr = now.map_or(0, |a| u32::from_ne_bytes(a.octets()));
        let mut map = HashMap::<_, u32, IfaceConfig>::try_from(self.map(MAP_IFACES)?)
            .map_err(map_err(MAP_IFACES))?;
        let mut cfg = map.get(&ifindex, 0).unwrap_or(IfaceConfig {
            role: role_raw(role),
            addr: 0,
        });
        if cfg.addr == addr {
            return Ok(None);
        }
        cfg.addr = addr;
        map.insert(ifindex, cfg, 0).map_err(map_err(MAP_IFACES))?;
        Ok(Some((name, now)))
    }

    /// Attaches again to `name`, which was deleted and created again: forgets the old
    /// ifindex and link (its pin too), declares the new one and attaches.
    pub fn reattach(&mut self, name: &str) -> Result<Attached, DataplaneError> {
        let Some(pos) = self.attached.iter().position(|(a, _)| a.name == name) else {
            return Err(DataplaneError::UnknownIface(name.to_string()));
        };
        let (old, held) = self.attached.remove(pos);
        match held {
            // The link died with the interface; only its pin remains.
            Held::Pinned(fd, path) => {
                let _ = std::fs::remove_file(&path);
                drop(fd);
            }
            Held::Owned(link) => {
                if let Ok(prog) = self.program() {
                    let _ = prog.detach(link);
                }
            }
        }
        if let Ok(mut m) = HashMap::<_, u32, IfaceConfig>::try_from(self.map(MAP_IFACES)?) {
            let _ = m.remove(&old.ifindex);
        }
        if let Ok(mut m) = DevMapHash::try_from(self.map(MAP_DEVMAP)?) {
            let _ = m.remove(old.ifindex);
        }
        let mut a = self.attach(name, old.role, old.mode)?;
        if let Err(e) = self.attach_learner(name) {
            log::warn!("{e}");
        }
        if let Err(e) = self.attach_marker(name) {
            log::warn!("{e}");
        }
        a.reattached = old.reattached + 1;
        if let Some((last, _)) = self.attached.last_mut() {
            last.reattached = a.reattached;
        }
        Ok(a)
    }

    /// Attaches the tc egress learner to `name` (after XDP), so flows the kernel forwards are
    /// known to the fast path.
    pub fn attach_learner(&mut self, name: &str) -> Result<(), DataplaneError> {
        let id = self.attach_tc(name, LEARNER, TcAttachType::Egress, |iface, source| {
            DataplaneError::Learner { iface, source }
        })?;
        self.learners.retain(|(n, _)| n != name);
        self.learners.push((name.to_string(), id));
        Ok(())
    }

    /// Attaches the tc ingress marker to `name`, so the kernel accepts what XDP passes it of
    /// the flows the fast path admitted (see nat-ebpf/src/mark.rs).
    pub fn attach_marker(&mut self, name: &str) -> Result<(), DataplaneError> {
        let id = self.attach_tc(name, MARKER, TcAttachType::Ingress, |iface, source| {
            DataplaneError::Marker { iface, source }
        })?;
        self.markers.retain(|(n, _)| n != name);
        self.markers.push((name.to_string(), id));
        Ok(())
    }

    /// Attaches the tc program `program` to `name` at `at`, the interface's clsact qdisc
    /// added first where needed; `failed` names what went wrong.
    fn attach_tc(
        &mut self,
        name: &str,
        program: &str,
        at: TcAttachType,
        failed: fn(String, ProgramError) -> DataplaneError,
    ) -> Result<SchedClassifierLinkId, DataplaneError> {
        if let Err(e) = aya::programs::tc::qdisc_add_clsact(name) {
            // Already there, or not needed with tcx (kernel >= 6.6).
            log::debug!("clsact on {name}: {e}");
        }
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .ok_or(DataplaneError::MissingProgram)?
            .try_into()
            .map_err(DataplaneError::Program)?;
        prog.attach(name, at)
            .map_err(|source| failed(name.to_string(), source))
    }

    fn detach_learners(&mut self) {
        for (program, held) in [
            (LEARNER, std::mem::take(&mut self.learners)),
            (MARKER, std::mem::take(&mut self.markers)),
        ] {
            let Some(Ok(prog)) = self
                .ebpf
                .program_mut(program)
                .map(<&mut SchedClassifier>::try_from)
            else {
                continue;
            };
            for (_, id) in held {
                let _ = prog.detach(id);
            }
        }
    }

    fn program(&mut self) -> Result<&mut Xdp, DataplaneError> {
        self.ebpf
            .program_mut(PROGRAM)
            .ok_or(DataplaneError::MissingProgram)?
            .try_into()
            .map_err(DataplaneError::Program)
    }

    /// Detaches from every interface (the object itself goes when `self` is dropped).
    pub fn detach_all(&mut self) -> Result<Vec<Attached>, DataplaneError> {
        self.detach_learners();
        let mut done = Vec::new();
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or(DataplaneError::MissingProgram)?
            .try_into()
            .map_err(DataplaneError::Program)?;
        for (a, held) in self.attached.drain(..) {
            match held {
                Held::Owned(link) => {
                    prog.detach(link).map_err(|source| DataplaneError::Detach {
                        iface: a.name.clone(),
                        source,
                    })?
                }
                // Without its pin, closing the last fd detaches the link.
                Held::Pinned(fd, path) => {
                    std::fs::remove_file(&path).map_err(|source| DataplaneError::Unpin {
                        path: path.clone(),
                        source,
                    })?;
                    drop(fd);
                }
            }
            done.push(a);
        }
        Ok(done)
    }
}
