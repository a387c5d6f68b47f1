"""MQTT broker fixture (mosquitto on a free loopback port)."""
