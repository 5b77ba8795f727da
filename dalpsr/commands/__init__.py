"""One module per `dalpsr` sub-command (parse → call the library → print); `dalpsr.cli` registers them."""
