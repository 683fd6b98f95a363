//! How a QEMU of the migration is started: Debian's stock
//! `qemu-system-x86_64` under TCG, guest RAM in a shared file, the VMM shim
//! preloaded to hand that RAM to the agent, QMP on a Unix socket, the serial
//! console in a file.

use std::ffi::OsString;
use std::path::Path;

use super::QemuOptions;
use super::guest::GuestImage;

/// One QEMU: its role and files.
#[derive(Debug)]
pub(super) struct QemuLaunch<'a> {
    /// "source" or "target" (the shim's role too).
    pub role: &'static str,
    pub image: &'a GuestImage,
    /// The `mem-path` file.
    pub ram: &'a Path,
    /// Its agent's hand-off socket.
    pub handoff_socket: &'a Path,
    pub serial_log: &'a Path,
    pub qmp_socket: &'a Path,
    /// The target: wait for QEMU's incoming migration (`-incoming defer`).
    pub incoming: bool,
    /// Guest RAM in the shared `ram` file (for the agents); otherwise
    /// anonymous memory (QEMU's own migration moves it).
    pub shared_ram_file: bool,
}

impl QemuLaunch<'_> {
    pub(super) fn args(&self, opts: &QemuOptions) -> Vec<String> {
        let mib = opts.memory_mib;
        let mut args: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-m".into(),
            format!("{mib}M"),
            "-smp".into(),
            "1".into(),
            "-object".into(),
            if self.shared_ram_file {
                format!("memory-backend-file,id=mem0,size={mib}M,mem-path={},share=on", self.ram.display())
            } else {
                format!("memory-backend-ram,id=mem0,size={mib}M")
            },
            "-machine".into(),
            "pc,memory-backend=mem0".into(),
            "-kernel".into(),
            self.image.kernel.display().to_string(),
            "-initrd".into(),
            self.image.initramfs.display().to_string(),
            "-append".into(),
            format!("console=ttyS0 quiet panic=-1 memcheck.mib={}", opts.checker_mib),
            "-nographic".into(),
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            "none".into(),
            "-no-reboot".into(),
            "-serial".into(),
            format!("file:{}", self.serial_log.display()),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", self.qmp_socket.display()),
        ];
        if self.incoming {
            args.extend(["-incoming".into(), "defer".into()]);
            if opts.verify_bytes {
                args.push("-S".into());
            }
        }
        args
    }

    /// The VMM shim's environment (`shim` is the library to preload).
    pub(super) fn shim_env(&self, shim: &Path) -> [(&'static str, OsString); 5] {
        [
            ("LD_PRELOAD", shim.into()),
            ("PAGESERVER_SHIM_ROLE", self.role.into()),
            ("PAGESERVER_SHIM_MEM_PATH", self.ram.into()),
            ("PAGESERVER_SHIM_SOCKET", self.handoff_socket.into()),
            ("PAGESERVER_SHIM_VM", "qemu-vm".into()),
        ]
    }
}
