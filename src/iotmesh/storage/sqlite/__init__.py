"""SQLite storage: the state store (`state.py`) and the time-series store (`tsdb.py`)."""
