"""claimwatch: real-time fraud monitoring for medical-insurance settlements (医保结算)."""

__version__ = "0.1.0"
