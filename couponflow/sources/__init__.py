"""Adapters that turn public data sets into couponflow's raw tables."""
