"""Jobs the daemon runs beside polling: daily frozen reads and backfill, time sync."""
