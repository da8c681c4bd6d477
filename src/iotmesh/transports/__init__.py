"""Servers that speak device and user protocols and drive the `proto` codecs."""
