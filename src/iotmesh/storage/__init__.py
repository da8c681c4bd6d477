"""Storage interfaces (time series, state) and their implementations."""
