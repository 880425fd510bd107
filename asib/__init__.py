"""asib: multi-teacher knowledge distillation."""
__version__ = "0.1.0"
