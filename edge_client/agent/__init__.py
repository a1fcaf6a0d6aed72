"""The background agent: trains only while the device's run conditions hold, holds a round when they fail, and is
installed as a systemd or launchd service."""
