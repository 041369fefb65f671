"""The RetailCRM integration service of the Vochi cloud PBX (port 8019)."""

__version__ = "0.1.0"
