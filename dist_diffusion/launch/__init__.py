"""The launch side of the package: placing local processes (``local``). The cluster launchers
(Ray, submitit) live in launchers/ and call the package."""
