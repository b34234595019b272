"""couponflow's HTTP API: offers of the current allocation, grants and redemptions."""

from serving.app import create_app

__all__ = ["create_app"]
