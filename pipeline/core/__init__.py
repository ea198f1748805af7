"""The base layer: what every other layer may use and that uses none of them."""
