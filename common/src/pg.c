/* pg: being written. */
