use pushgrid_room::{Listeners, ROLE, RoomConfig, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Ok(
        pushgrid_common::cli::role_main::<RoomConfig, _, _>(ROLE, |config, shutdown| async move {
            let listeners = Listeners::bind(&config).await?;
            run(config, listeners, shutdown).await
        })
        .await?,
    )
}
