"""systemd units shipped with the package (``freezeframe-daemon.service``), for packagers;
``freezeframe schedule install-systemd`` writes ones fitted to an installation."""
