"""One router per concern: predict, items, interactions, admin, health."""
