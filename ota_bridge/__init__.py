"""ota-bridge: jobs and OTA updates for fleets of Linux IoT devices."""

__version__ = "0.1.0"
