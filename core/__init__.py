"""chatroom: domain word + reference images -> annotated image dataset."""

__version__ = "0.1.0"
