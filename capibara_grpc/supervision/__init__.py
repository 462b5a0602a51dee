"""Running the mesh's processes: `capibara up` starts them (launcher), watches and restarts them
(children, supervisor), gives each its CPU priority, reports a death by name and signal
(process_exit), builds llama-server's command line (launch_commands), and checks at install that
llama-server runs on this CPU (install_check, cpu_baseline)."""
