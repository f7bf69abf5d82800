"""The annotation workbench's engine room: a workspace of images, the flywheel that drafts them, sessions that
prompt them, and the FastAPI app (``medseg serve``) that serves them. Sessions, the workspace and the flywheel
are plain classes, usable without HTTP."""
