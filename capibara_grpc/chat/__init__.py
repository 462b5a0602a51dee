"""The chat every service shares: its plain types (types.py), its protobuf conversions, each
written once (convert.py), and the request's fields and limits with the one validation every
edge runs (request.py)."""
