//! Child processes that do not outlive their owner: a campaign or a test that fails
//! midway leaves no worker or broker running.

use std::process::{Child, Command};

use anyhow::{Context, ensure};

/// A child process killed (SIGKILL) and reaped when dropped, if still running.
pub struct Reaped(pub Child);

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Reaped {
    /// Sends `signal` by its `kill` name (`TERM`, `STOP`, `CONT`, ...).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.0.id().to_string()])
            .status()
            .context("running kill")?;
        ensure!(status.success(), "kill -{signal} failed");
        Ok(())
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(Some(_)))
    }
}
