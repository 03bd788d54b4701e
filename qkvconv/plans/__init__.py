"""Conversions as data: a `Plan` is a list of recipes (output tensor <- inputs, steps), and transforms
rewrite plans (rotary order, K/V heads, norm folding). Imports `model` only."""
