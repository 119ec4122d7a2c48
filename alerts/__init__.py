"""Alerts: the model (contract ``alert.schema.json``), the durable store, exports."""
