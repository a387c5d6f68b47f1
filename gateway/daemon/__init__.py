"""The daemon: lifecycle, the fleet of buses and drivers, the poll schedule, metrics, logs, status."""
