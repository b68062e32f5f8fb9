"""The environment variables that mark every process of a mesh run.

The reaper finds processes by these, including descendants that left their
process group (setsid) after the supervisor died; defined once here because
the plan writes them and the reaper, in another process, reads them.
"""

#: The run's id, in every process of the run.
MARKER_ENV = "MESHCTL_RUN_ID"
#: Which process of the run (``replica/role``): lets a sweep find one process's descendants.
PROCESS_ENV = "MESHCTL_PROCESS"
