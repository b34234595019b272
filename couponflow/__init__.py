"""couponflow: coupon targeting under a budget, and measurement of what it caused."""

__version__ = "0.1.0"
