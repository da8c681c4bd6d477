"""Settings, domain types, errors and the service lifecycle shared by every layer."""
