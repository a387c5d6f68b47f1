"""MQTT to the head-end: the session, the connection, the wire contract, meter events."""
